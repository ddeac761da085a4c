"""dino_platform: the Ray layer of dino-platform (storage, data, training, evaluation, tracking, pipelines).

Lives in ``platform/dino_platform`` on purpose: a top-level package named ``platform`` would shadow
Python's standard-library ``platform`` module whenever the repository root is on ``sys.path``.
"""
__version__ = "0.1.0"
