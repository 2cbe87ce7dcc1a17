"""The benchmarks must not rot: run them in their reduced CPU form. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_gpu_benchmark_tiny_cpu_form(tmp_path: Path) -> None:
    # The compile modes are left out here: compiling on this CPU takes most of a minute per mode, and the
    # compile path is tested once, in tests/engine/test_speed.py.
    modes_asked = ("plain", "default", "cache", "compile+fp8")
    _run("gpu_fullsize.py", "--tiny", "--reps", "1", "--modes", *modes_asked, "--out", str(tmp_path))
    report = json.loads((tmp_path / "gpu_fullsize_schnell_tiny.json").read_text())
    modes = {r["mode"]: r for r in report["rows"]}
    assert set(modes) == set(modes_asked)
    assert all(modes[m]["end_to_end_s"] > 0 for m in ("plain", "default", "cache"))
    assert "compute capability" in modes["compile+fp8"]["skipped"]
    assert "| cache |" in (tmp_path / "gpu_fullsize_schnell_tiny.md").read_text()


def test_cpu_benchmarks_small_form(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    small = ("--sizes", "256", "--requests", "4", "--clients", "2", "--rounds", "1")
    _run("cpu_throughput.py", *small, "--json", str(out))
    run = json.loads(out.read_text())["runs"][0]
    assert run["ratio_max_batch_1"] > 0 and run["ratio_max_batch_8"] > 0
    single = tmp_path / "single.json"
    _run("http_vs_diffusers.py", "--reps", "1", "--size", "256", "--json", str(single))
    assert json.loads(single.read_text())["ratio"] > 0


def test_gpu_server_benchmark_tiny_cpu_form(tmp_path: Path) -> None:
    _run("gpu_server.py", "--tiny", "--reps", "1", "--clients", "2", "--per-client", "1", "--out", str(tmp_path))
    report = json.loads((tmp_path / "gpu_server_tiny.json").read_text())
    assert report["sequential"]["ratio"] > 0
    assert report["concurrent"]["batching_on"]["images"] == 2 == report["concurrent"]["batching_off"]["images"]
