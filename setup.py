"""megatron-gdn: Gated DeltaNet as a first-class Megatron layer.

`kernels/` installs as `megatron_gdn.kernels` (torch + triton only, no Megatron); PyPI has an
unrelated top-level `kernels` package, so we never install one under that name.
"""
from setuptools import find_packages, setup

PACKAGES = ["megatron_gdn"] + [f"megatron_gdn.{p}" for p in find_packages("megatron_gdn")]
PACKAGES += ["megatron_gdn.kernels"] + [f"megatron_gdn.kernels.{p}" for p in find_packages("kernels")]

setup(
    name="megatron-gdn",
    version="0.1.0",
    description="Gated DeltaNet layers, Triton kernels and context parallelism for Megatron-core",
    python_requires=">=3.12",
    packages=PACKAGES,
    package_dir={"megatron_gdn": "megatron_gdn", "megatron_gdn.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "numpy",
        "pyyaml",
        "megatron-core>=0.19.2,<0.20",
    ],
    extras_require={
        # deepspeed here so that CI runs the ZeRO parity tests (on its CPU accelerator)
        # matplotlib: the recall study's plots (examples/eval/plot_recall.py)
        "dev": ["pytest>=8", "psutil", "transformers>=5", "deepspeed", "matplotlib"],
        "bench": ["flash-linear-attention==0.6.0", "fla-core==0.6.0"],
        "deepspeed": ["deepspeed"],
        # cuDNN's band attention for sliding windows (megatron_gdn/hybrid/swa_cudnn.py)
        "cudnn": ["nvidia-cudnn-frontend>=1.32"],
        "te": ["transformer-engine[pytorch]"],
    },
)
