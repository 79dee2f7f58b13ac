"""The only module that touches sam2's internals.

Everything the toolkit does with a SAM 2 model below the public ``SAM2ImagePredictor`` /
``SAM2AutomaticMaskGenerator`` API lives here, so a sam2 release that renames a private
attribute breaks one file, and fails at import with a one-line message (the pin in
pyproject.toml is ``sam2==1.1.0``):

- :class:`Sam2Adapter` builds the image predictor with feature sizes derived from the model's
  input resolution (the predictor hard-codes those of a 1024 input), encodes images (one or a
  batch, as ``set_image`` / ``set_image_batch`` leave them), loads cached features back into
  the predictor, and maps prompt pixel coordinates to model-input coordinates through the
  predictor's own transforms: the engine and training use this same mapping.
- :class:`PromptDecoder` is the trainable part of SAM 2 (prompt encoder + mask decoder): training
  calls it with gradients, the engine under ``inference_mode``, so both decode identically.
- :func:`autocast` is the one mixed-precision context (bfloat16 on CUDA, as SAM 2 recommends).
- :func:`stock_generator` is SAM 2's automatic mask generator with the same feature sizes.
"""
from __future__ import annotations

import contextlib
import inspect
from importlib import metadata
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

SAM2_VERSION = "1.1.0"
#: Private attributes of ``SAM2ImagePredictor`` read or written here.
PREDICTOR_PRIVATE = ("_features", "_bb_feat_sizes", "_orig_hw", "_is_image_set", "_is_batch", "_transforms")


def _check_sam2() -> None:
    """Fail at import, in one line, when the installed sam2 lacks what this module uses."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    try:
        version = metadata.version("sam2")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        version = "unknown"
    source = inspect.getsource(SAM2ImagePredictor)
    missing = [name for name in PREDICTOR_PRIVATE if f"self.{name}" not in source]
    missing += [m for m in ("set_image", "set_image_batch", "reset_predictor") if not hasattr(SAM2ImagePredictor, m)]
    if missing:
        raise ImportError(
            f"sam2 {version} is not supported (mosaic-sam needs sam2=={SAM2_VERSION}): "
            f"SAM2ImagePredictor lacks {', '.join(missing)}"
        )


_check_sam2()


def feature_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """Spatial sizes of the backbone features (high-res 0, high-res 1, embedding) for the model."""
    side = model.image_size // model.backbone_stride
    return [(4 * side, 4 * side), (2 * side, 2 * side), (side, side)]


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA (as SAM 2 recommends); full precision elsewhere.

    A caller may wrap calls in ``torch.autocast("cpu", dtype=torch.bfloat16)`` itself (the
    tests do, to exercise the bf16 path without a GPU): this context then leaves it alone.
    """
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Sam2Adapter:
    """Encoding, cached features and prompt coordinates of one SAM 2 model."""

    def __init__(self, model: nn.Module) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model
        self.feat_sizes = feature_sizes(model)
        self.predictor = SAM2ImagePredictor(model)
        self.predictor._bb_feat_sizes = self.feat_sizes

    # ------------------------------------------------------------- encoding
    def encode(self, image: np.ndarray) -> dict[str, Any]:
        """Features of one RGB uint8 image: ``{"image_embed": 1xCxhxw, "high_res_feats": [..]}``.

        Runs under the caller's grad / autocast mode.
        """
        self.predictor.set_image(image)
        return self.predictor._features

    def encode_batch(self, images: Sequence[np.ndarray]) -> list[list[torch.Tensor]]:
        """``[image_embed 1xCxhxw, high_res_0, high_res_1]`` per image (``set_image_batch``)."""
        # Writable copies where needed: torchvision warns about read-only arrays.
        self.predictor.set_image_batch([np.require(im, requirements=["C", "W"]) for im in images])
        feats = self.predictor._features
        tensors = [feats["image_embed"], *feats["high_res_feats"]]
        self.predictor.reset_predictor()
        return [[t[i : i + 1] for t in tensors] for i in range(len(images))]

    def use(self, features: dict[str, Any], hw: tuple[int, int]) -> Any:
        """The predictor with cached ``features`` of an ``hw`` image loaded (as set_image leaves it)."""
        p = self.predictor
        p.reset_predictor()
        p._features = features
        p._orig_hw = [hw]
        p._is_image_set = True
        p._is_batch = False
        return p

    # ------------------------------------------------------------- prompts
    def model_coords(self, points: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Pixel ``[x, y]`` coordinates of an ``hw`` image -> model-input coordinates."""
        return self.predictor._transforms.transform_coords(points, normalize=True, orig_hw=hw)



class PromptDecoder(nn.Module):
    """The trainable part of SAM 2 (prompt encoder + mask decoder) as one module for DDP.

    ``forward`` decodes one positive point per prompt for several images, as
    ``SAM2ImagePredictor._predict`` does for single-mask output without upsampling. Training
    calls it with gradients, the engine under ``inference_mode``: one decoding for both.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder

    def forward(
        self, batch: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor], torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``batch``: (image_embed 1xCxhxw, [high-res features], points Kx2 in model-input
        pixels) per image; returns (low-res logits K x 4h x 4w, predicted IoU K) per image."""
        image_pe = self.prompt_encoder.get_dense_pe()
        out = []
        for embed, high_res, coords in batch:
            labels = torch.ones((len(coords), 1), dtype=torch.int, device=coords.device)
            sparse, dense = self.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
            low_res, iou, _, _ = self.mask_decoder(
                image_embeddings=embed,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
                repeat_image=True,
                high_res_features=list(high_res),
            )
            out.append((low_res[:, 0], iou[:, 0]))
        return out


def stock_generator(model: nn.Module, **kwargs: Any):
    """SAM 2's ``SAM2AutomaticMaskGenerator`` with feature sizes matching the model's input size."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(model, **kwargs)
    generator.predictor._bb_feat_sizes = feature_sizes(model)
    return generator
