"""Datasets: synthetic data (``synth``), ingest into Parquet shards (``ingest``, ``manifest``), label
spaces (``categories``), and streaming through Ray Data (``transforms``, ``streaming``, ``batches``,
``sharding``). Importing this package is cheap: Ray is imported only by the modules that need it.
"""
