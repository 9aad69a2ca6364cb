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


def test_ratio_curve_takes_lopqs_fastest_setting_at_each_faiss_recall():
    """The comparison with faiss: at every setting on faiss's speed/recall frontier,
    lopq's fastest setting with at least that recall (0 when none reaches it); the
    lowest ratio over faiss's settings within 10% of its best recall."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run

    class Rows:
        def __init__(self):
            self.rows = []

        def add(self, part, name, value, unit, **params):
            self.rows.append((name, value))

    # (system, setting, q/s, R@1, R@10)
    points = [("lopq V=64", "quota=250", 9000.0, 0.30, 0.50),
              ("lopq V=64", "quota=500", 5000.0, 0.35, 0.60),
              ("lopq V=256", "quota=500", 2000.0, 0.40, 0.70),
              ("faiss IVF", "nprobe=1", 20000.0, 0.20, 0.40),
              ("faiss IVF", "nprobe=2", 10000.0, 0.30, 0.55),
              ("faiss IVF", "nprobe=4", 4000.0, 0.36, 0.65),
              ("faiss IVF", "nprobe=8", 3000.0, 0.37, 0.66),
              ("faiss IVF", "nprobe=16", 1000.0, 0.37, 0.66),  # dominated: not compared
              ("faiss other", "nprobe=1", 500.0, 0.45, 0.75),
              # PCA'd rows: only in the "(with PCA)" ratios, never in lopq's own
              ("lopq PCA128 V=64", "quota=250", 1500.0, 0.46, 0.80)]
    rows = Rows()
    run.compare_curves(rows, "toy", points, {})
    got = dict(rows.rows)
    assert got["lopq / faiss queries/s at faiss's recall@10 0.400 (faiss IVF nprobe=1), "
               "toy"] == 9000 / 20000
    assert got["lopq / faiss queries/s at faiss's recall@10 0.550 (faiss IVF nprobe=2), "
               "toy"] == 5000 / 10000
    assert got["lopq / faiss queries/s at faiss's recall@10 0.660 (faiss IVF nprobe=8), "
               "toy"] == 2000 / 3000
    assert got["lopq / faiss queries/s at faiss's recall@10 0.750 (faiss other nprobe=1), "
               "toy"] == 0.0
    assert not any("nprobe=16" in name for name in got)
    # within 10% of faiss's best R@10 (0.75): 0.75 alone (0.66 < 0.675) -> 0
    assert got["lowest lopq / faiss queries/s over faiss's top recall@10 decile, toy"] == 0
    assert got["lopq / faiss queries/s at faiss's best recall@10, toy"] == 0
    assert got["lopq / faiss queries/s at faiss's best recall@1, toy"] == 0
    assert got["lopq best recall@1, toy"] == 0.40
    assert got["lopq (with PCA) / faiss queries/s at faiss's best recall@10, toy"] == 3.0
    assert got["lopq (with PCA) / faiss queries/s at faiss's recall@10 0.400 (faiss IVF "
               "nprobe=1), toy"] == 9000 / 20000
    # the decile is R@10 >= 0.675: faiss's 0.75 alone
    assert got["lowest lopq (with PCA) / faiss queries/s over faiss's top recall@10 "
               "decile, toy"] == 3.0
    assert got["lopq (with PCA) best recall@10, toy"] == 0.80
