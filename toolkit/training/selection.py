"""Which epoch a run keeps, and whether a fine-tune beats its base (one rule for both).

Validation measures two things per epoch (``Trainer.validate``):

* ``val_dice``: the mean pixel Dice of prompt-free segmentation of every validation image
  (``Sam2Engine.segment``, as at inference) against its ground-truth mask;
* ``val_prompt_iou``: the prompted score, the mean IoU of the mask decoded at each validation
  tessera's point against that tessera (the training objective, measured on held-out images).

The rule (:func:`compare`): segmentation Dice decides when it discriminates, i.e. when the two
Dice values differ by more than ``DICE_TOLERANCE``; otherwise the prompted score decides; equal
prompted scores are a tie. The trainer keeps the later epoch on a tie, so an untrained epoch
(where prompt-free segmentation often keeps nothing: Dice 0 everywhere) can never be kept over
a later one with a better prompted score. The backend's ``better`` promotion rule promotes a
fine-tune only when it is better than the current model by the same rule with a margin
(``PROMOTE_MARGIN`` on the prompted score): a difference in the fifth decimal is no improvement.
"""
from __future__ import annotations

from typing import Any, Mapping

#: Segmentation Dice differences up to this are noise: the prompted score decides then.
DICE_TOLERANCE = 0.005
#: How much higher the prompted score must be for the backend to promote on it.
PROMOTE_MARGIN = 0.01
DICE_KEY = "val_dice"
PROMPT_KEY = "val_prompt_iou"


def compare(new: Mapping[str, Any], old: Mapping[str, Any] | None, prompt_margin: float = 0.0) -> int:
    """1 when ``new`` validation scores are better than ``old``, -1 when worse, 0 on a tie.

    Both map ``val_dice`` and ``val_prompt_iou`` to floats (a missing value counts as 0);
    anything beats ``None``. Prompted scores within ``prompt_margin`` of each other tie.
    """
    if old is None:
        return 1
    d_new, d_old = float(new.get(DICE_KEY) or 0.0), float(old.get(DICE_KEY) or 0.0)
    if abs(d_new - d_old) > DICE_TOLERANCE:
        return 1 if d_new > d_old else -1
    p_new, p_old = float(new.get(PROMPT_KEY) or 0.0), float(old.get(PROMPT_KEY) or 0.0)
    if abs(p_new - p_old) <= prompt_margin:
        return 0
    return 1 if p_new > p_old else -1


def describe(scores: Mapping[str, Any] | None) -> str:
    """``Dice 0.1234, prompted IoU 0.5678`` (for messages)."""
    if scores is None:
        return "no validation"
    return f"Dice {float(scores.get(DICE_KEY) or 0):.4f}, prompted IoU {float(scores.get(PROMPT_KEY) or 0):.4f}"
