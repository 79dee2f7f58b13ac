"""Core: the dataset contract, image and file I/O, errors, tiling."""
