"""Shared dataset fixtures.

  tiny_dataset_factory  session: make_tiny(splits, seed) -> a 3-image synthetic dataset folder
  tiny_dataset          session: three tiny synthetic mosaics, splits train, train, val
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mosaic_toolkit.core.dataset import write_manifest
from mosaic_toolkit.data.synth import synth_dataset


@pytest.fixture(scope="session")
def tiny_dataset_factory(tmp_path_factory: pytest.TempPathFactory):
    """Three tiny synthetic mosaics (56-72 px, 20 px tesserae) with the given splits."""
    made: dict[tuple, Path] = {}

    def make(splits: tuple[str, ...] = ("train", "train", "val"), seed: int = 3) -> Path:
        key = (tuple(splits), seed)
        if key not in made:
            root = tmp_path_factory.mktemp("tiny") / "data"
            samples = synth_dataset(root, len(splits), seed=seed, min_size=56, max_size=72, tessera_size=20)
            for sample, split in zip(samples, splits):
                sample.split = split
            write_manifest(root, samples)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_dataset(tiny_dataset_factory) -> Path:
    return tiny_dataset_factory()
