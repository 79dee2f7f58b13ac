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
- :func:`select_output` is the one place that decides which of the mask decoder's four output
  tokens a mask comes from (see "Decoder outputs" below); :class:`ServedDecoder` applies it
  with the call signature of sam2's ``MaskDecoder`` and records the tokens it returned.
- :class:`PromptDecoder` is the trainable part of SAM 2 (prompt encoder + mask decoder): training
  calls it with gradients, the engine under ``inference_mode``, so both decode identically.
- :func:`autocast` is the one mixed-precision context (bfloat16 on CUDA, as SAM 2 recommends).
- :func:`stock_generator` is SAM 2's automatic mask generator with the same feature sizes.

Decoder outputs
---------------
SAM 2's mask decoder has four output tokens, each with its own output head (hypernetwork MLP)
and IoU head: token 0 gives the single mask, tokens 1-3 the three "multimask" candidates.
sam2 picks between them in ``MaskDecoder.forward``: ``multimask_output=True`` returns tokens
1-3 (callers keep the best-scored), ``False`` returns token 0, except that in eval mode a
token-0 mask whose stability is under 0.98 is silently replaced by the best of tokens 1-3
(``dynamic_multimask_via_stability``). Fine-tuning trains one output; the others keep the base
weights while the shared transformer under them moved. So every decoding here runs through
:func:`select_output` with the model's *output* (``params.OUTPUTS``):

- ``"sam2"`` (a base model, decoder untrained): SAM 2's own behaviour, unchanged;
- ``"single"`` (what ``train`` trains by default): token 0, always: no best-of-three, no
  stability fallback, in training and in eval mode alike;
- ``"multimask-first"`` (the thesis trained ``multimask_output=True`` and read
  ``prd_masks[:, 0]``): token 1, always.

Clicks, the fast path, the stock generator, tuning and training (loss and validation) all
decode through a :class:`ServedDecoder`, so a fine-tuned model is served exactly the output it
was trained on.
"""
from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from importlib import metadata
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .params import OUTPUT_MULTIMASK_FIRST, OUTPUT_SAM2, OUTPUT_SINGLE, OUTPUTS

SAM2_VERSION = "1.1.0"
#: Private attributes of ``SAM2ImagePredictor`` read or written here.
PREDICTOR_PRIVATE = ("_features", "_bb_feat_sizes", "_orig_hw", "_is_image_set", "_is_batch", "_transforms")
#: Attributes of sam2's ``MaskDecoder`` that :func:`select_output` reads.
MASK_DECODER_ATTRIBUTES = ("dynamic_multimask_via_stability", "dynamic_multimask_stability_thresh")


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
    from sam2.modeling.sam.mask_decoder import MaskDecoder

    decoder_source = inspect.getsource(MaskDecoder)
    missing += [f"MaskDecoder.{m}" for m in ("predict_masks", "_get_stability_scores")
                if not hasattr(MaskDecoder, m)]
    missing += [f"MaskDecoder.{a}" for a in MASK_DECODER_ATTRIBUTES if f"self.{a}" not in decoder_source]
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


# ------------------------------------------------------------------ decoder outputs
#: The decoder token a trained output reads (the only one it is served with).
OUTPUT_TOKEN = {OUTPUT_SINGLE: 0, OUTPUT_MULTIMASK_FIRST: 1}


def _valid_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"unknown decoder output {output!r} (choose from {', '.join(OUTPUTS)})")
    return output


def select_output(
    decoder: nn.Module, masks: torch.Tensor, ious: torch.Tensor, output: str, multimask_output: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masks a model with decoder ``output`` returns: (logits BxMxhxw, IoU BxM, tokens BxM).

    ``masks`` / ``ious`` hold all four tokens (``MaskDecoder.predict_masks``); ``tokens`` says
    which token each returned mask came from. A trained output ("single", "multimask-first")
    returns its one token whatever ``multimask_output`` asks and whether or not the decoder is
    in training mode. ``"sam2"`` is ``MaskDecoder.forward``'s own choice, value for value:
    tokens 1-3 for ``multimask_output``, else token 0 with the stability fallback in eval mode.
    """
    batch = masks.shape[0]
    device = masks.device
    if output in OUTPUT_TOKEN:
        t = OUTPUT_TOKEN[output]
        return masks[:, t : t + 1], ious[:, t : t + 1], torch.full((batch, 1), t, dtype=torch.long, device=device)
    _valid_output(output)
    if multimask_output:
        tokens = torch.arange(1, 4, device=device).expand(batch, 3)
        return masks[:, 1:], ious[:, 1:], tokens
    single, single_iou = masks[:, 0:1], ious[:, 0:1]
    if not (decoder.dynamic_multimask_via_stability and not decoder.training):
        return single, single_iou, torch.zeros((batch, 1), dtype=torch.long, device=device)
    # MaskDecoder._dynamic_multimask_via_stability, also telling which token won.
    best = torch.argmax(ious[:, 1:], dim=-1)
    rows = torch.arange(batch, device=device)
    best_logits = masks[:, 1:][rows, best].unsqueeze(1)
    best_iou = ious[:, 1:][rows, best].unsqueeze(1)
    stable = decoder._get_stability_scores(single) >= decoder.dynamic_multimask_stability_thresh
    logits = torch.where(stable[..., None, None].expand_as(single), single, best_logits)
    iou = torch.where(stable.expand_as(single_iou), single_iou, best_iou)
    tokens = torch.where(stable[:, 0], torch.zeros_like(best), best + 1)[:, None]
    return logits, iou, tokens


class ServedDecoder:
    """sam2's ``MaskDecoder`` decoding through :func:`select_output` with one fixed output.

    Called like ``MaskDecoder.forward`` (which is what ``SAM2ImagePredictor`` and the automatic
    mask generator call), returns the same four values. ``tokens_seen`` counts the decoder
    tokens of every mask returned (tests assert a fine-tune never returns another),
    ``last_tokens`` holds the last call's.
    Not an ``nn.Module``: it holds the decoder without registering its weights a second time.
    """

    def __init__(self, decoder: nn.Module, output: str = OUTPUT_SAM2) -> None:
        self.decoder = decoder
        self.output = _valid_output(output)
        self.tokens_seen: Counter[int] = Counter()
        self.last_tokens: torch.Tensor | None = None  # BxM tokens of the last call

    def __call__(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        masks, ious, mask_tokens_out, object_score_logits = self.decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
            repeat_image=repeat_image,
            high_res_features=high_res_features,
        )
        masks, ious, tokens = select_output(self.decoder, masks, ious, self.output, multimask_output)
        self.last_tokens = tokens
        self.tokens_seen.update(tokens.flatten().tolist())
        # As MaskDecoder.forward for images: the object-pointer token is token 0's.
        return masks, ious, mask_tokens_out[:, 0:1], object_score_logits


class _ServedModel:
    """A SAM 2 model whose ``sam_mask_decoder`` is a :class:`ServedDecoder` (for sam2's
    predictor and generator, which call ``model.sam_mask_decoder(...)``); all else delegates."""

    def __init__(self, model: nn.Module, served: ServedDecoder) -> None:
        self.__dict__.update(model=model, sam_mask_decoder=served)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)


class Sam2Adapter:
    """Encoding, cached features, prompt coordinates and clicks of one SAM 2 model.

    ``output`` is the model's decoder output (module docstring); every decoding through this
    adapter's predictor uses it.
    """

    def __init__(self, model: nn.Module, output: str = OUTPUT_SAM2) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model
        self.output = _valid_output(output)
        self.served = ServedDecoder(model.sam_mask_decoder, output)
        self.feat_sizes = feature_sizes(model)
        self.predictor = SAM2ImagePredictor(_ServedModel(model, self.served))
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

    def click(
        self, features: dict[str, Any], hw: tuple[int, int], coords: np.ndarray, labels: np.ndarray,
        box: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Masks (MxHxW logits at image size), scores (M) and decoder tokens (M) of click prompts.

        A base model ("sam2") answers a single positive-or-negative click without a box with
        SAM 2's three candidates (the caller keeps the best-scored); a trained output always
        answers with its one mask.
        """
        multimask = self.output == OUTPUT_SAM2 and len(coords) == 1 and box is None
        predictor = self.use(features, hw)
        masks, scores, _ = predictor.predict(
            point_coords=coords if len(coords) else None,
            point_labels=labels if len(coords) else None,
            box=box,
            multimask_output=multimask,
            return_logits=True,
        )
        return masks, scores, self.served.last_tokens[0].tolist()

    # ------------------------------------------------------------- prompts
    def model_coords(self, points: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Pixel ``[x, y]`` coordinates of an ``hw`` image -> model-input coordinates."""
        return self.predictor._transforms.transform_coords(points, normalize=True, orig_hw=hw)



class PromptDecoder(nn.Module):
    """The trainable part of SAM 2 (prompt encoder + mask decoder) as one module for DDP.

    ``forward`` decodes one positive point per prompt for several images, as
    ``SAM2ImagePredictor._predict`` does for single-mask output without upsampling, reading
    the decoder ``output`` (module docstring): the output training trains is the one it
    returns, and the engine's fast path, tuning and validation decode with the model's output.
    Training calls it with gradients, the engine under ``inference_mode``: one decoding for both.
    """

    def __init__(self, model: nn.Module, output: str = OUTPUT_SAM2) -> None:
        super().__init__()
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder
        self.served = ServedDecoder(self.mask_decoder, output)

    @property
    def output(self) -> str:
        return self.served.output

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
            low_res, iou, _, _ = self.served(
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


def stock_generator(model: nn.Module, served: ServedDecoder | None = None, **kwargs: Any):
    """SAM 2's ``SAM2AutomaticMaskGenerator`` with feature sizes matching the model's input size,
    decoding through ``served`` (default: SAM 2's own output choice).

    A base model keeps the generator's ``multimask_output=True`` (three masks per grid point);
    a trained output gives one mask per point, its own (the refinement pass of ``use_m2m`` too).
    """
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    served = served or ServedDecoder(model.sam_mask_decoder)
    kwargs.setdefault("multimask_output", served.output == OUTPUT_SAM2)
    generator = SAM2AutomaticMaskGenerator(model, **kwargs)
    generator.predictor.model = _ServedModel(model, served)
    generator.predictor._bb_feat_sizes = feature_sizes(model)
    return generator
