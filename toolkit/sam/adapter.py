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
#: Attributes of sam2's ``MaskDecoder`` that :func:`select_output` and
#: :func:`predict_masks_shared_image` read.
MASK_DECODER_ATTRIBUTES = (
    "dynamic_multimask_via_stability", "dynamic_multimask_stability_thresh", "pred_obj_scores",
    "obj_score_token", "iou_token", "mask_tokens", "num_mask_tokens", "transformer",
    "use_high_res_features", "output_upscaling", "output_hypernetworks_mlps", "iou_prediction_head",
    "pred_obj_score_head",
)
#: What :func:`predict_masks_shared_image` uses of sam2's two-way transformer.
TRANSFORMER_ATTRIBUTES = {
    "TwoWayTransformer": ("layers", "final_attn_token_to_image", "norm_final_attn"),
    "TwoWayAttentionBlock": ("self_attn", "norm1", "cross_attn_token_to_image", "norm2", "mlp", "norm3",
                             "norm4", "cross_attn_image_to_token", "skip_first_layer_pe"),
    "Attention": ("num_heads", "q_proj", "k_proj", "v_proj", "out_proj", "dropout_p", "_separate_heads",
                  "_recombine_heads"),
}


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
    from sam2.modeling.sam import transformer

    for cls, names in TRANSFORMER_ATTRIBUTES.items():
        source = inspect.getsource(getattr(transformer, cls))
        missing += [f"{cls}.{a}" for a in names if f"self.{a}" not in source and f"def {a}" not in source]
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
        return self._select(masks, ious, mask_tokens_out, object_score_logits, multimask_output)

    def _select(self, masks, ious, mask_tokens_out, object_score_logits, multimask_output):
        masks, ious, tokens = select_output(self.decoder, masks, ious, self.output, multimask_output)
        self.last_tokens = tokens
        if self.output in OUTPUT_TOKEN:  # one known token: counted without reading the device
            self.tokens_seen[OUTPUT_TOKEN[self.output]] += tokens.numel()
        else:
            self.tokens_seen.update(tokens.flatten().tolist())
        # As MaskDecoder.forward for images: the object-pointer token is token 0's.
        return masks, ious, mask_tokens_out[:, 0:1], object_score_logits

    def points(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embedding: torch.Tensor,
        high_res_features: list[torch.Tensor],
        multimask_output: bool = False,
        windows: torch.Tensor | None = None,
        window_cells: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``__call__`` (one image repeated for every prompt) for point prompts whose dense
        embedding ``1xCxhxw`` is the same for all (no mask prompt), through
        :func:`predict_masks_shared_image`: the same values, less work."""
        masks, ious, mask_tokens_out, object_score_logits = predict_masks_shared_image(
            self.decoder, image_embeddings, image_pe, sparse_prompt_embeddings,
            dense_prompt_embedding, high_res_features, windows, window_cells,
        )
        return self._select(masks, ious, mask_tokens_out, object_score_logits, multimask_output)


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sam2's ``Attention.forward`` where ``q`` or ``k``/``v`` may have batch 1 for a batch of
    B: that side is projected once and broadcast (its gradient is summed over the batch)."""
    heads = attn.num_heads
    q = attn._separate_heads(attn.q_proj(q), heads)
    k = attn._separate_heads(attn.k_proj(k), heads)
    v = attn._separate_heads(attn.v_proj(v), heads)
    batch = max(q.shape[0], k.shape[0])
    q, k, v = (t.expand(batch, -1, -1, -1) for t in (q, k, v))
    dropout_p = attn.dropout_p if attn.training else 0.0
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return attn.out_proj(attn._recombine_heads(out))


def predict_masks_shared_image(
    decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embedding: torch.Tensor,
    high_res_features: list[torch.Tensor] | None,
    windows: torch.Tensor | None = None,
    window_cells: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks(..., repeat_image=True)`` for B prompts on one image whose
    dense prompt embedding (``1xCxhxw``) is the same for every prompt, without repeating the
    image B times where nothing depends on the prompt.

    ``windows`` (B x 2, top-left ``[row, column]`` in cells of the image embedding) with
    ``window_cells`` = S: the masks of each prompt are computed in its S x S-cell window only,
    B x M x 4S x 4S (the same values as that window of the full masks): a tessera's mask
    needs a small part of the image, and the upscaling is a large part of the per-prompt work.

    sam2 copies the image tokens (and their positional encoding) once per prompt and runs the
    two-way transformer on every copy. Up to the first layer's image-to-token attention the
    image side does not depend on the prompt: the image tokens plus the dense embedding, the
    first token-to-image attention's key and value projections, the first image-to-token
    attention's query projection. Those run here once per image and are broadcast over the
    prompts (autograd sums their gradients), the rest is sam2's own modules (the later
    transformer layers are called as they are) with the same operations in the same order, so
    the values equal ``predict_masks``'s to float rounding (tests/test_adapter.py), for ~23 %
    fewer decoder FLOPs per prompt (training step, forward and backward; bench/bench_train.py
    ``flops``) and no B-fold copies of the image tokens and positional encoding.
    """
    dec = decoder
    tr = dec.transformer
    first = tr.layers[0]
    if not first.skip_first_layer_pe:
        raise ValueError("predict_masks_shared_image: the first transformer layer adds positional encodings")
    s = 1 if dec.pred_obj_scores else 0
    weights = [dec.obj_score_token.weight] if dec.pred_obj_scores else []
    output_tokens = torch.cat([*weights, dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    batch = tokens.shape[0]

    src = image_embeddings + dense_prompt_embedding  # 1xCxhxw, once
    _, c, h, w = src.shape
    # TwoWayTransformer.forward, its first layer (skip_first_layer_pe) written out:
    keys = src.flatten(2).permute(0, 2, 1)  # 1 x hw x C
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    k = keys + key_pe  # prompt-independent: once
    queries = first.norm2(queries + _attention(first.cross_attn_token_to_image, queries + tokens, k, keys))
    queries = first.norm3(queries + first.mlp(queries))
    attn_out = _attention(first.cross_attn_image_to_token, k, queries + tokens, queries)
    keys = first.norm4(keys + attn_out)  # B x hw x C from here on
    for layer in tr.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    attn_out = tr.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    hs = tr.norm_final_attn(queries + attn_out)
    # The rest of MaskDecoder.predict_masks.
    iou_token_out = hs[:, s, :]
    mask_tokens_out = hs[:, s + 1 : (s + 1 + dec.num_mask_tokens), :]
    src = keys.transpose(1, 2).view(batch, c, h, w)
    if windows is not None:
        # The upscaling (2x2 stride-2 transposed convolutions, per-pixel LayerNorm and GELU)
        # and the mask product are pixel-local: a window of the embedding gives exactly the
        # same window of the low-resolution logits.
        src = _window(src, windows, window_cells, 1)
        if high_res_features is not None:
            high_res_features = [_window(high_res_features[0], windows, window_cells, 4),
                                 _window(high_res_features[1], windows, window_cells, 2)]
    if not dec.use_high_res_features:
        upscaled_embedding = dec.output_upscaling(src)
    else:
        dc1, ln1, act1, dc2, act2 = dec.output_upscaling
        feat_s0, feat_s1 = high_res_features
        upscaled_embedding = act1(ln1(dc1(src) + feat_s1))
        upscaled_embedding = act2(dc2(upscaled_embedding) + feat_s0)
    hyper_in = torch.stack(
        [dec.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(dec.num_mask_tokens)], dim=1
    )
    b, c, h, w = upscaled_embedding.shape
    masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = dec.iou_prediction_head(iou_token_out)
    if dec.pred_obj_scores:
        object_score_logits = dec.pred_obj_score_head(hs[:, 0, :])
    else:
        object_score_logits = 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1)
    return masks, iou_pred, mask_tokens_out, object_score_logits


def _window(features: torch.Tensor, windows: torch.Tensor, cells: int, scale: int) -> torch.Tensor:
    """Per-prompt ``cells*scale``-square windows (top-left ``windows*scale``) of ``features``
    (1 or B x C x H x W) -> B x C x cells*scale x cells*scale."""
    size = cells * scale
    offsets = torch.arange(size, device=windows.device)
    rows = (windows[:, 0:1] * scale + offsets)[:, :, None]  # B x size x 1
    cols = (windows[:, 1:2] * scale + offsets)[:, None, :]  # B x 1 x size
    batch = torch.arange(len(windows), device=windows.device)[:, None, None]
    source = features.expand(len(windows), -1, -1, -1)
    return source.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


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
    The image side of the first transformer layer runs once per image, not once per prompt
    (:func:`predict_masks_shared_image`; the same values as sam2's ``predict_masks``).
    Training calls it with gradients, the engine under ``inference_mode``: one decoding for both.
    """

    def __init__(self, model: nn.Module, output: str = OUTPUT_SAM2, share_image: bool = True) -> None:
        super().__init__()
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder
        self.served = ServedDecoder(self.mask_decoder, output)
        #: Decode through :func:`predict_masks_shared_image` (the image side of the first
        #: transformer layer once per image); False: sam2's ``predict_masks`` with the image
        #: repeated per prompt (same values; bench/bench_train.py times both).
        self.share_image = share_image

    @property
    def output(self) -> str:
        return self.served.output

    def forward(
        self, batch: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor], torch.Tensor]],
        multimask: bool = False,
        windows: Sequence[torch.Tensor] | None = None,
        window_cells: int = 0,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``batch``: (image_embed 1xCxhxw, [high-res features], points Kx2 in model-input
        pixels) per image; returns (low-res logits K x 4h x 4w, predicted IoU K) per image.

        ``multimask``: every candidate of the model's output instead, (K x M x 4h x 4w, K x M):
        a base model's three (tokens 1-3), a trained output's one. ``windows`` (one K x 2
        tensor per image) and ``window_cells``: the masks in those windows only
        (:func:`predict_masks_shared_image`), K x M x 4S x 4S.
        """
        image_pe = self.prompt_encoder.get_dense_pe()
        out = []
        for index, (embed, high_res, coords) in enumerate(batch):
            labels = torch.ones((len(coords), 1), dtype=torch.int, device=coords.device)
            sparse, dense = self.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
            if self.share_image or multimask or windows is not None:
                # No mask prompt: every prompt's dense embedding is the same (no_mask_embed).
                low_res, iou, _, _ = self.served.points(
                    embed, image_pe, sparse, dense[:1], list(high_res), multimask_output=multimask,
                    windows=None if windows is None else windows[index], window_cells=window_cells)
                if multimask:
                    out.append((low_res, iou))
                    continue
            else:
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
