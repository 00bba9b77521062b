"""cxrkit: chest X-ray classification from data to a deployable model."""

__version__ = "0.1.0"
