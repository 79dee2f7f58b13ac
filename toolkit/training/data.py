"""Training data: prompts drawn per image, the on-disk embedding cache, the torch Dataset."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..core.dataset import Dataset, Sample
from ..core.io import atomic_file
from ..core.errors import MosaicError


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
def sample_prompts(n: int, max_prompts: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """Indices (sorted) of the tesserae prompted for image ``index`` in ``epoch``.

    All of them when ``max_prompts`` is 0 or at least ``n``; otherwise ``max_prompts`` drawn
    without replacement by a generator seeded with ``(seed, epoch, index)``, so the draw does
    not depend on data-loader workers, process count or resumption.
    """
    if max_prompts == 0 or n <= max_prompts:
        return np.arange(n)
    rng = np.random.default_rng([seed, epoch, index])
    return np.sort(rng.choice(n, size=max_prompts, replace=False))


# --------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------
class EmbeddingCache:
    """Image features on disk, one torch file per image, keyed so stale entries are never read.

    ``model_key`` identifies the encoder (base checkpoint sha256, config, input resolution);
    an entry's key adds the image file's sha256. Tensors are stored in fp16 (float32 for an
    image whose features overflow fp16).
    """

    def __init__(self, folder: Path, model_key: str) -> None:
        self.folder = folder
        self.model_key = model_key

    def key(self, image_sha: str) -> str:
        return hashlib.sha256(f"{self.model_key}|{image_sha}".encode()).hexdigest()

    def path(self, stem: str, image_sha: str) -> Path:
        return self.folder / f"{stem}.{self.key(image_sha)[:24]}.pt"

    def has(self, stem: str, image_sha: str) -> bool:
        return self.path(stem, image_sha).is_file()

    def save(self, stem: str, image_sha: str, features: Sequence[torch.Tensor]) -> None:
        half = [t.detach().to("cpu", torch.float16) for t in features]
        if not all(torch.isfinite(t).all() for t in half):
            half = [t.detach().to("cpu", torch.float32) for t in features]
        # clone(): a feature may be a view into a batch, and torch.save writes whole storages.
        with atomic_file(self.path(stem, image_sha)) as tmp:
            torch.save({"key": self.key(image_sha), "features": [t.clone() for t in half]}, tmp)

    def load(self, stem: str, image_sha: str) -> list[torch.Tensor]:
        path = self.path(stem, image_sha)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise MosaicError(f"{path}: unreadable embedding cache entry ({exc}); delete it") from exc
        if not isinstance(data, dict) or data.get("key") != self.key(image_sha):
            raise MosaicError(f"{path}: embedding cache entry does not match its image; delete it")
        return data["features"]


# --------------------------------------------------------------------------------------------
# Training images
# --------------------------------------------------------------------------------------------
class TrainImages(torch.utils.data.Dataset):
    """Training items: prompts, tessera ids and instance map, plus cached features or the image.

    The prompts of an item depend on the epoch (``set_epoch``), never on worker scheduling.
    """

    def __init__(
        self,
        dataset: Dataset,
        samples: Sequence[Sample],
        hashes: Sequence[str] | None,
        cache: EmbeddingCache | None,
        max_prompts: int,
        seed: int,
    ) -> None:
        self.dataset = dataset
        self.samples = list(samples)
        self.hashes = hashes
        self.cache = cache
        self.max_prompts = max_prompts
        self.seed = seed
        self.epoch = 0
        self.use_cache = cache is not None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        instances = self.dataset.instances(sample)
        points = np.asarray(self.dataset.points(sample), dtype=np.int64).reshape(-1, 2)
        label = str(self.dataset.root / "points" / f"{sample.stem}.json")
        check_points(label, instances, points)
        if len(points) == 0:
            raise MosaicError(f"{label}: no tesserae, but the manifest lists {sample.tesserae}")
        chosen = sample_prompts(len(points), self.max_prompts, self.seed, self.epoch, index)
        item = {
            "stem": sample.stem,
            "hw": instances.shape,
            "points": torch.from_numpy(points[chosen].astype(np.float32)),
            "ids": torch.from_numpy(chosen + 1),
            "instances": torch.from_numpy(instances),
        }
        if self.use_cache:
            item["features"] = self.cache.load(sample.stem, self.hashes[index])
        else:
            item["image"] = self.dataset.image(sample)
            if item["image"].shape[:2] != instances.shape:
                raise MosaicError(
                    f"{sample.stem}: image is {item['image'].shape[1]}x{item['image'].shape[0]}, "
                    f"instance map {instances.shape[1]}x{instances.shape[0]}"
                )
        return item


def check_points(label: str, instances: np.ndarray, points: np.ndarray) -> None:
    """Points must be one per tessera id 1..N, each inside its own tessera (dataset contract);
    a MosaicError starting with ``label`` (the points file) otherwise."""
    n = int(instances.max(initial=0))
    if len(points) != n:
        raise MosaicError(f"{label}: {len(points)} points but {n} tesserae in the instance map")
    h, w = instances.shape
    if n and ((points < 0).any() or (points[:, 0] >= w).any() or (points[:, 1] >= h).any()):
        raise MosaicError(f"{label}: a prompt point lies outside the image")
    if n and (instances[points[:, 1], points[:, 0]] != np.arange(1, n + 1)).any():
        raise MosaicError(f"{label}: points are not inside their tesserae in id order")


def _as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collate function: keep a batch as a list (images differ in size and prompt count)."""
    return items
