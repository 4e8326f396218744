"""benchmarks/gpu.py runs without Ray (the GPU machine has none): tiny, on CPU, every number it prints."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As on the GPU machine: `import ray` fails, the script is run from the repo root, rayanom not installed.
RUN = ("import sys; sys.modules['ray'] = None; import runpy; sys.argv = ['benchmarks/gpu.py', *sys.argv[1:]]; "
       "runpy.run_path('benchmarks/gpu.py', run_name='__main__')")
TINY = ["--device", "cpu", "--models", "dfkde,dfm", "--backbone", "resnet18", "--image-size", "64", "--file-px", "96",
        "--rows", "16", "--batch-size", "8", "--distinct", "32", "--fit-images", "32", "--precision", "fp32",
        "--seconds", "1"]
FORMATS = ("png", "jpeg")


def _positive(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in xs)


@pytest.mark.timeout(300)
def test_gpu_benchmark_runs_without_ray(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", RUN, *TINY, "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ray importable: False" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["dfkde", "dfm"]
    lines = proc.stdout.splitlines()
    for r in rows:
        assert (r["precision"], r["backbone"], r["image_size"], r["batch_size"]) == ("fp32", "resnet18", [64, 64], 8)
        assert _positive(r["bare_ips"], r["stage_ips"], r["call_ips"], *r["decode_per_core"].values())
        assert set(r["decode_per_core"]) == set(FORMATS) == set(r["e2e"]) == set(r["cpus_needed"])
        assert r["stage_rows"] == 16 and min(r["bare_timed"], r["stage_timed"], r["call_timed"]) >= 8
        assert r["call_timed"] % r["rows_per_part"] == 0  # the actor-call phase is timed in whole joined parts
        assert r["stage_ratio"] == pytest.approx(r["stage_ips"] / r["bare_ips"])
        assert r["call_ratio"] == pytest.approx(r["call_ips"] / r["bare_ips"])
        for fmt in FORMATS:
            assert _positive(r["e2e"][fmt]["ips"]) and r["e2e"][fmt]["rows"] >= 8
            for k in ("bare", "stage"):  # the decode CPUs one GPU needs: the model rate / decode per core
                assert r["cpus_needed"][fmt][k] == pytest.approx(r[f"{k}_ips"] / r["decode_per_core"][fmt])
        utils = [r[f"gpu_util_{k}"] for k in ("bare", "stage", "call")] + [e["gpu_util"] for e in r["e2e"].values()]
        assert utils == [None] * 5  # CPU: n/a
        line = next(x for x in lines if x.split()[:1] == [r["model"]])
        assert line.split()[:4] == [r["model"], "fp32", "resnet18", "64x64"]
        assert f"({r['stage_ratio']:.2f}, n/a)" in line and f"({r['call_ratio']:.2f}, n/a)" in line
        assert any(x.startswith(f"decode CPUs one GPU needs, {r['model']}: PNG ") and "JPEG" in x for x in lines)
        assert any(x.startswith(f"target, {r['model']}: stage {r['stage_ratio']:.2f} of the bare forward")
                   for x in lines)
    assert sum("decode CPUs one GPU needs" in x for x in lines) == 2
    assert sum(x.startswith("decode per core (one thread, decode_table 96² -> 64x64): PNG ") for x in lines) == 1
