"""nsa_dist: Native Sparse Attention for Megatron-style distributed pretraining."""
from setuptools import find_packages, setup

setup(
    name="nsa_dist",
    version="0.1.0",
    description="Native Sparse Attention (NSA) with tensor/sequence parallelism and Triton kernels",
    python_requires=">=3.10",
    # nsa_dist.kernels is the top-level kernels/ folder (no __init__.py there, so it never shadows
    # another "kernels" package); nsa_dist/kernels/__init__.py points a source checkout at it
    packages=find_packages(include=["nsa_dist", "nsa_dist.*"]),
    package_dir={"nsa_dist.kernels": "kernels"},
    install_requires=["torch>=2.3", "pyyaml", "numpy"],
    extras_require={
        "train": ["deepspeed>=0.15", "sentencepiece", "tensorboard", "safetensors", "tqdm"],
        "gpu": ["triton>=3.0"],
        "hf": ["transformers>=4.45", "safetensors", "tokenizers", "sentencepiece", "protobuf"],
        "test": ["pytest", "hypothesis", "triton>=3.0", "deepspeed>=0.15", "sentencepiece",
                 "tensorboard", "safetensors", "tqdm", "transformers>=4.45", "tokenizers", "protobuf"],
    },
    entry_points={"console_scripts": ["nsa-pretrain=nsa_dist.training.cli:main",
                                      "nsa-convert=nsa_dist.convert.cli:main"]},
)
