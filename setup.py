"""Install spectral_kernels; build the optional CUDA extension from csrc/ when possible.

The pure-Python package installs everywhere. The extension ``spectral_kernels._cuda`` is
built only when torch was built with CUDA, nvcc is found, and SPECTRAL_KERNELS_SKIP_CUDA
is not "1". Architectures come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0"); MAX_JOBS
bounds parallel compile jobs (default 2, for small machines).
"""
import glob
import os

from setuptools import find_packages, setup


def cuda_extension_kwargs():
    """setup() arguments that build spectral_kernels._cuda from csrc/, or {} to skip it.

    Skipped when SPECTRAL_KERNELS_SKIP_CUDA=1, when torch has no CUDA, or when nvcc
    (CUDA_HOME) is missing: the package then runs on its torch/triton backends alone.
    The C++ standard is left to torch (it adds the one its headers need).
    """
    if os.environ.get("SPECTRAL_KERNELS_SKIP_CUDA", "0") == "1":
        return {}
    sources = sorted(glob.glob("csrc/*.cu")) + ["csrc/binding.cpp"]
    if not os.path.exists("csrc/binding.cpp"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", "2")
    here = os.path.dirname(os.path.abspath(__file__))
    ext = CUDAExtension(
        name="spectral_kernels._cuda",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="spectral_kernels",
    version="0.1.0",
    description="Fused GPU kernels for spectral clustering of neural-network attention affinities",
    packages=find_packages(include=["spectral_kernels", "spectral_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "models": ["onnx", "scikit-image", "pillow"],
        "test": ["pytest", "pytest-benchmark", "scipy", "scikit-image", "onnx", "pillow", "tqdm"],
    },
    entry_points={"console_scripts": ["spectral-kernels=spectral_kernels.cli:main"]},
    **cuda_extension_kwargs(),
)
