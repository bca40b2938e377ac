"""nsa_dist: Native Sparse Attention for Megatron-style distributed pretraining."""
from setuptools import setup

setup(
    name="nsa_dist",
    version="0.1.0",
    description="Native Sparse Attention (NSA) with tensor/sequence parallelism and Triton kernels",
    python_requires=">=3.10",
    packages=[
        "nsa_dist",
        "nsa_dist.ops",
        "nsa_dist.modules",
        "nsa_dist.models",
        "nsa_dist.parallel",
        "nsa_dist.data",
        "nsa_dist.training",
        "nsa_dist.kernels",
    ],
    # Triton kernels live in the top-level kernels/ folder but install as nsa_dist.kernels.
    package_dir={"nsa_dist.kernels": "kernels"},
    install_requires=["torch>=2.3", "pyyaml", "numpy"],
    extras_require={
        "train": ["deepspeed>=0.15", "sentencepiece", "tensorboard", "safetensors", "tqdm"],
        "gpu": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "triton>=3.0", "deepspeed>=0.15", "sentencepiece",
                 "tensorboard", "safetensors", "tqdm"],
    },
    entry_points={"console_scripts": ["nsa-pretrain=nsa_dist.training.cli:main"]},
)
