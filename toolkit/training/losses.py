"""Pure loss functions of fine-tuning (as sam2's training/loss_fns.py)."""
from __future__ import annotations


import torch
import torch.nn.functional as F


DICE_SMOOTH = 1.0  # added to numerator and denominator of the soft Dice (empty-mask safety)


def _soft_overlaps(low_res_logits: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits upsampled to ``targets``' size, soft overlap |p t| per prompt, |p| + |t| per
    prompt) with ``p = sigmoid(logits)``, in float32."""
    logits = F.interpolate(
        low_res_logits[:, None].float(), size=targets.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0]
    t = targets.float()
    probs = logits.sigmoid()
    inter = (probs * t).flatten(1).sum(1)
    total = probs.flatten(1).sum(1) + t.flatten(1).sum(1)
    return logits, inter, total


def _dice_loss(inter: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return 1.0 - (2.0 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)


def prompt_losses(
    low_res_logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, pooled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt (Dice loss, IoU-score loss) of K decoded masks against their tesserae.

    ``low_res_logits`` K x h x w are upsampled (bilinear, like the predictor) to the size of the
    boolean ``targets`` K x H x W. Dice loss: ``1 - (2|p t| + 1) / (|p| + |t| + 1)`` on
    ``p = sigmoid(logits)``; with ``pooled``, one Dice loss over all K prompts instead
    (:func:`image_dice`), computed from the same upsampled masks. Score loss:
    ``|iou_pred - IoU(logits > 0, t)|`` with the IoU of the thresholded mask (probability 0.5)
    as a detached target. Computed in float32.
    """
    logits, inter, total = _soft_overlaps(low_res_logits, targets)
    dice = _dice_loss(inter.sum(), total.sum()) if pooled else _dice_loss(inter, total)
    with torch.no_grad():
        pred = logits > 0
        both = (pred & targets).flatten(1).sum(1).float()
        either = (pred | targets).flatten(1).sum(1).float()
        iou_true = torch.where(either > 0, both / either.clamp(min=1), torch.ones_like(either))
    score = (iou_pred.float() - iou_true).abs()
    return dice, score


def image_dice(low_res_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One Dice loss over all K prompts of an image (the thesis's): overlaps and areas of the
    K masks are summed before the ratio, so a large tessera weighs more than a small one."""
    _, inter, total = _soft_overlaps(low_res_logits, targets)
    return _dice_loss(inter.sum(), total.sum())
