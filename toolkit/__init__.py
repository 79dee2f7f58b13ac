"""mosaic_toolkit: segment every tessera of a mosaic (data, metrics, SAM 2 engine, CLI)."""

__version__ = "0.1.0"
