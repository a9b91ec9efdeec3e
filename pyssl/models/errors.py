"""The error of the models package."""


class ModelError(ValueError):
    """Unknown backbone name or impossible head configuration."""
