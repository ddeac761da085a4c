"""Training on Ray Train + DeepSpeed: typed config, the driver, the per-worker loop, checkpoints."""
