"""Package layout that pyproject.toml cannot say alone: the top-level ``recipes/`` and ``calib_data/``
folders ship inside the wheel as ``qwen_quant/recipes`` and ``qwen_quant/calib_data`` (read through
`qwen_quant.resources`), so an installed ``qwen-quant demo`` finds its recipe and data; in a clone
they stay where the README and the data generator expect them."""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

DATA = {"qwen_quant.recipes": "recipes", "qwen_quant.calib_data": "calib_data"}


class DataOnly(build_py):
    """The data folders ship their data, not their scripts (calib_data/generate.py stays in the clone)."""

    def find_package_modules(self, package, package_dir):
        return [] if package in DATA else super().find_package_modules(package, package_dir)


setup(
    packages=find_packages(include=["qwen_quant*"]) + list(DATA),
    package_dir=DATA,
    package_data={"qwen_quant": ["report/schema.json"], "qwen_quant.recipes": ["*.yaml"],
                  "qwen_quant.calib_data": ["*.jsonl", "*.txt"]},
    cmdclass={"build_py": DataOnly},
)
