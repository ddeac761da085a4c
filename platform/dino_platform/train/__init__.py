"""Training on Ray Train + DeepSpeed: typed config, per-worker loop, checkpoints, the ``dino train``/``dino eval`` commands."""
