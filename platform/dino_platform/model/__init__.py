"""The model: its config, the one saved-model format and its loader, the detector interface."""
