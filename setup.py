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
    # spark_me/configs is a symlink to the top-level configs/ (the Hydra config tree);
    # building a wheel copies the YAML files into the package.
    package_data={"spark_me": ["configs/*.yaml", "configs/*/*.yaml"]},
    entry_points={
        "console_scripts": [
            "spark-me-pretrain=spark_me.pretrain:main",
            "spark-me-export=spark_me.export:main",
            "spark-me-reconstruct=spark_me.reconstruct_cli:main",
        ]
    },
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
