"""`cxr serve`: the web page and JSON API around a trained model (see `app.py`)."""

from cxrkit.serve.app import create_app

__all__ = ["create_app"]
