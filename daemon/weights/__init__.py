"""The model folder on disk: pulling the official weights, key manifests, tiny random-weight models."""
