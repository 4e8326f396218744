"""Re-thresholding cost: ``jobs/decide.py`` on existing scores, against what scoring the same rows costs.

    python benchmarks/decide.py [--rows 1000000] [--out benchmarks/decide-results.json]

Writes a scores directory as DFKDE scoring leaves it (every column, parts of 4,096 rows, decided with one threshold),
then times the whole ``jobs/decide.py --threshold`` process on it (Ray start-up included), which rewrites every part,
and once more with the same threshold, which only reads the part footers. Scoring's own rate on this machine is in the
README (Performance); the ratio is printed against it. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCORING_IMAGES_PER_S = 67.8  # README, Performance: steady scoring, DFKDE resnet50 bf16 on these 2 cores


def _scores(out: str, rows: int, per_part: int = 4096) -> None:
    sys.path.insert(0, REPO)
    from rayanom.decisions import Threshold, with_decisions
    from rayanom.parts import write_part

    rng = np.random.default_rng(0)
    os.makedirs(out)
    with open(os.path.join(out, "_rayanom_scores.json"), "w") as f:
        json.dump({"format": "rayanom-scores", "format_version": 3, "model": "benchmark", "n_rows": rows}, f)
    t = Threshold(0.0, -5.0, 5.0)
    for k in range(-(-rows // per_part)):
        n = min(per_part, rows - k * per_part)
        labels = rng.integers(0, 2, n)
        score = rng.normal(size=n) + labels
        table = pa.table({
            "path": [f"s3://bucket/images/{k:06d}/{i:05d}-a-typical-file-name.png" for i in range(n)],
            "label": labels, "split": ["test"] * n,
            "row_index": np.arange(k * per_part, k * per_part + n), "anomaly_score": score,
            "anomaly_probability": 1 / (1 + np.exp(-score)), "error": pa.nulls(n, pa.string())})
        write_part(out, k, with_decisions(table, t), "bench")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--out", default=os.path.join(HERE, "decide-results.json"))
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory() as tmp:
        scores = os.path.join(tmp, "scores")
        _scores(scores, args.rows)
        walls = {}
        for name, value in (("rewrite", "0.5"), ("unchanged", "0.5")):
            t0 = time.time()
            proc = subprocess.run([sys.executable, "jobs/decide.py", "--scores", scores, "--threshold", value,
                                   "--quiet"], cwd=REPO, env=env, capture_output=True, text=True)
            walls[name] = round(time.time() - t0, 1)
            assert proc.returncode == 0, proc.stderr[-2000:]
            print(name, walls[name], "s:", proc.stdout.strip().splitlines()[0])
    rate = args.rows / walls["rewrite"]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "rows": args.rows, "decide_wall_s": walls["rewrite"], "decide_unchanged_wall_s": walls["unchanged"],
              "decide_rows_per_s": round(rate), "scoring_images_per_s": SCORING_IMAGES_PER_S,
              "cost_vs_scoring": round(SCORING_IMAGES_PER_S / rate, 5)}
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
