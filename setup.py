"""spark_me: SparK masked pre-training with truly sparse encoders.

MinkowskiEngine is a dependency that pip cannot build by itself: install it with
``make install`` (or ``docker/minkowski/build.sh``) before ``pip install -e .``.
"""
from setuptools import find_packages, setup

setup(
    name="spark_me",
    version="0.1.0",
    description="SparK masked pre-training for convnets with MinkowskiEngine sparse encoders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["spark_me", "spark_me.*"]),
    install_requires=[
        "torch>=2.5",
        "torchvision",
        "MinkowskiEngine==0.5.4",
        "timm>=1.0",
        "numpy",
        "hydra-core>=1.3",
        "wandb",
    ],
    extras_require={"dev": ["pytest>=8", "matplotlib"]},
)
