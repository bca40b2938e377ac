"""nsa_dist: Native Sparse Attention for Megatron-style distributed pretraining."""
import os

from setuptools import find_packages, setup

# Triton kernels live in the top-level kernels/ folder but install as nsa_dist.kernels.
KERNEL_PACKAGES = ["nsa_dist.kernels"] + [f"nsa_dist.kernels.{p}" for p in find_packages("kernels")]

setup(
    name="nsa_dist",
    version="0.1.0",
    description="Native Sparse Attention (NSA) with tensor/sequence parallelism and Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["nsa_dist", "nsa_dist.*"])
    + (KERNEL_PACKAGES if os.path.isdir("kernels") else []),
    package_dir={"nsa_dist.kernels": "kernels"},
    install_requires=["torch>=2.3", "pyyaml", "numpy"],
    extras_require={
        "train": ["deepspeed>=0.15", "sentencepiece", "tensorboard", "safetensors", "tqdm"],
        "gpu": ["triton>=3.0"],
        "hf": ["transformers>=4.45", "safetensors"],
        "test": ["pytest", "hypothesis", "triton>=3.0", "deepspeed>=0.15", "sentencepiece",
                 "tensorboard", "safetensors", "tqdm", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["nsa-pretrain=nsa_dist.training.cli:main",
                                      "nsa-convert=nsa_dist.convert.cli:main"]},
)
