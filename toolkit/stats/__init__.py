"""Per-tessera measures and the mosaic report."""
