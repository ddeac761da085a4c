"""Ray Tune sweeps over the training job (``spec``: the YAML declaration; ``tuner``: running it)."""
