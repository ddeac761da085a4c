"""Datasets: synthetic data, ingest into Parquet shards, and streaming through Ray Data.

Modules: ``synth`` (demo datasets), ``ingest`` (COCO/Objects365 JSON + images -> shards),
``manifest`` (what a shard directory holds), ``transforms`` (DINO's augmentation),
``streaming`` (Ray Data pipelines and ``collate``), ``batches`` (a worker's collated batches),
``sharding`` (how a worker group's datasets are split), ``categories`` (label spaces).
Importing this package is cheap: Ray is imported only by the modules that need it.
"""
