"""`python -m build` makes an sdist and a wheel (the wheel from the sdist, so the sdist
is complete); the wheel, installed in a fresh venv without PySpark, fits, encodes and
searches, and `import lopq.spark` names the extra to install."""

import os
import zipfile

import pytest
from conftest import run_checked

pytestmark = pytest.mark.slow

CORE_USE = r"""
import sys
import numpy as np
import lopq
from lopq import LOPQModel, LOPQSearcher
from lopq._kernels import default_backend
assert "pyspark" not in sys.modules
rng = np.random.default_rng(0)
X = rng.standard_normal((3000, 16)).astype(np.float32)
model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X, n_init=1, random_state=0)
coarse, fine = model.encode(X)
assert coarse.shape == (3000, 2) and fine.shape == (3000, 4)
searcher = LOPQSearcher(model)
searcher.add_data(X)
results, visited = searcher.search(X[0], quota=50)
assert results[0].id == 0, results[:3]
print("backend", default_backend())
try:
    import pyspark  # noqa: F401
    print("pyspark importable")
except ImportError:
    pass
try:
    import lopq.spark  # noqa: F401
except ImportError as err:
    print("spark:", err)
"""


def test_wheel_in_a_fresh_venv_without_pyspark(wheel_venv, tmp_path):
    dist, venv = wheel_venv
    wheels, sdists = list(dist.glob("lopq-*.whl")), list(dist.glob("lopq-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert any("_kernels/_cython" in n and n.endswith(".so") for n in names)
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    core = sorted(r.split(">")[0].split("<")[0].split("=")[0].strip() for r in requires
                  if "extra ==" not in r)
    # threadpoolctl: small decompositions on one BLAS thread (lopq/_kernels/blas.py)
    assert core == ["numba", "numpy", "protobuf", "threadpoolctl"], requires
    assert any(r.startswith("pyspark") and 'extra == "spark"' in r for r in requires), requires

    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOPQ_KERNELS")}
    out = run_checked(python, "-c", CORE_USE, cwd=tmp_path, env=env)
    assert "backend cython" in out  # the compiled extension came with the wheel
    assert "pyspark importable" not in out
    assert "spark: lopq.spark needs PySpark: pip install 'lopq[spark]'" in out
