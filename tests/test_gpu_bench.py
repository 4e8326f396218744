"""benchmarks/gpu.py runs without Ray (the GPU machine has none): tiny, on CPU, every row it prints."""

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
        "--seconds", "1", "--torch-jpeg", "on"]


@pytest.mark.timeout(300)
def test_gpu_benchmark_runs_without_ray(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", RUN, *TINY, "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ray importable: False" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["format"]) for r in rows] == [(m, f) for m in ("dfkde", "dfm") for f in ("png", "jpeg")]
    table = proc.stdout.splitlines()
    for r in rows:
        assert any(line.split()[:3] == [r["model"], r["format"], "fp32"] for line in table)
        rates = [r["ceiling_ips"], r["decode_ips"], r["e2e_ips"], r["ratio"], *r["decode_rates"].values()]
        assert all(math.isfinite(x) and x > 0 for x in rates), r
        assert set(r["decode_rates"]) == {"threads", "procs"} and r["e2e_rows"] >= 8
        assert r["gpu_util_ceiling"] is None and r["gpu_util_e2e"] is None  # CPU: n/a
        if r["format"] == "jpeg":  # the torch decode path, on CPU here
            assert math.isfinite(r["torch_jpeg_ips"]) and r["torch_jpeg_ips"] > 0
            assert r["parity"]["png_image_max_abs_diff"] < 1e-4  # same pixels: torch's resize agrees with Pillow's
            assert math.isfinite(r["parity"]["jpeg_feature_max_abs_diff"])
    assert sum("decode CPUs one GPU needs" in line for line in table) == 2
