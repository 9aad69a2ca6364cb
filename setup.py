"""Build lopq and its Cython extension: ``pip install .`` (``.[bench]`` for peers)."""

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

extensions = [
    Extension("lopq._kernels._cython", ["lopq/_kernels/_cython.pyx"],
              include_dirs=[np.get_include()],
              extra_compile_args=["-O3", "-ffast-math", "-march=x86-64-v2"],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]),
]

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
    install_requires=["numpy>=1.24", "numba>=0.59", "protobuf>=4.21", "cython>=3.0",
                      "pyspark>=3.5"],
    extras_require={
        "mat": ["scipy"],
        "bench": ["faiss-cpu", "threadpoolctl", "matplotlib", "scipy"],
        "test": ["pytest", "ruff", "scipy"],
    },
    zip_safe=False,
)
