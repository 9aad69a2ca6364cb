"""The benchmark command keeps running: its kernel part on tiny sizes."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_kernels_part_runs_and_reports_agreement(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
                           "--only", "kernels", "--scale", "0.05", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in results["results"] if r["part"] == "kernels"]
    compiled = [r for r in rows if "agreement" in r]
    assert {r["name"].split(" numba")[0].split(" cython")[0] for r in compiled} >= {
        "assign d=64 k=256", "assign d=8 k=256", "encode_fine M=16 S=256 ds=8",
        "project_residuals d=64 V=64", "accumulate_covariance d=64 V=64", "adc_scan M=16"}
    assert all(r["agreement"] >= 0.99 for r in compiled), compiled
    assert "| assign d=8 k=256 cython |" in (tmp_path / "results.md").read_text()
