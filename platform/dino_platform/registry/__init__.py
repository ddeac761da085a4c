"""The MLflow model registry (registered versions, the champion alias); ``registry.cli`` holds ``dino predict``/``dino export``."""
