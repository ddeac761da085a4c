"""Model registry (MLflow registered models, the champion alias) and ``dino predict``."""
