"""Build lopq and its Cython extension: ``pip install .`` (``.[bench]`` for peers)."""

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup


def _kernel_extension(name, pyx):
    """A Cython module with both copies of the fused kernels: AVX2/FMA and portable,
    chosen when the module loads (lopq/_kernels/_fused_api.h). No -march flags: the
    wheel runs on any CPU of its platform."""
    kernels = "lopq/_kernels/"
    return Extension(
        name, [kernels + pyx, kernels + "_fused_avx2.c", kernels + "_fused_portable.c"],
        include_dirs=[np.get_include(), "lopq/_kernels"],
        depends=[kernels + h for h in ("_fused.h", "_fused_api.h", "_fused_entries.h",
                                       "_fused_variant.h")],
        extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])


extensions = [_kernel_extension("lopq._kernels._cython", "_cython.pyx"),
              _kernel_extension("lopq._kernels._search", "_search.pyx"),
              # Reading the default data format's lines (lopq.formats.VectorLineDecoder)
              Extension("lopq._kernels._lines", ["lopq/_kernels/_lines.pyx"],
                        extra_compile_args=["-O3"])]

setup(
    name="lopq",
    version="0.1.0",
    description="Locally Optimized Product Quantization: training on Spark, compiled "
                "kernels, search",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lopq", "lopq.*"]),
    ext_modules=cythonize(extensions, language_level=3),
    # What the core needs at run time. Cython is a build requirement (pyproject.toml);
    # PySpark is an extra: clusters bring their own Spark, and a pip pyspark beside it
    # could shadow the cluster's version.
    install_requires=["numpy>=1.24", "numba>=0.59", "protobuf>=4.21", "threadpoolctl>=3"],
    extras_require={
        "spark": ["pyspark>=3.5", "pyarrow>=11", "pandas>=2.2,<3"],
        "mat": ["scipy"],
        "lmdb": ["lmdb"],
        "bench": ["faiss-cpu", "threadpoolctl", "matplotlib", "scipy"],
        "test": ["pytest", "ruff", "scipy", "lmdb", "build"],
    },
    zip_safe=False,
)
