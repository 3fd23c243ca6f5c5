"""Build of ringmaster-kernels: the Python package plus the pybind11 queue extension."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "ringmaster_kernels._queue",
        ["csrc/bindings.cpp"],
        include_dirs=["csrc"],
        # Header-only core: list it so editing a header rebuilds the extension.
        depends=["csrc/ringmaster/queue.hpp", "csrc/ringmaster/harness.hpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="ringmaster-kernels",
    version="0.1.0",
    description="Fused kernels and an async runtime for LMO-momentum training (Muon, Scion, Gluon, Ringmaster LMO)",
    packages=find_packages(include=["ringmaster_kernels", "ringmaster_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; sys_platform == 'linux'",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
    },
    entry_points={"console_scripts": ["ringmaster=ringmaster_kernels.cli:main"]},
)
