"""The MLflow model registry: registered versions and the champion alias."""
