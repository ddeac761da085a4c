"""Build hook for the optional MSDeformAttn extension (see csrc/ and README "Kernels").

All metadata lives in pyproject.toml; this file only adds the compiled extension when it can be built.
"""
from setuptools import setup

setup()
