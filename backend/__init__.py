"""mosaic_backend: a Label Studio ML backend serving the mosaic_toolkit engines over HTTP."""

__version__ = "0.1.0"
