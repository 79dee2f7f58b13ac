"""The run folder: file names, metrics.csv, training.png, the recorded configuration."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..core.io import atomic_file
from ..core.errors import MosaicError


STATE_FORMAT = "mosaic-sam-train-state"
STATE_VERSION = 1
FINETUNE_NAME = "finetune.pt"
STATE_NAME = "last.pt"
METRICS_NAME = "metrics.csv"
PLOT_NAME = "training.png"
TB_DIR = "tb"
CACHE_DIR = "cache"
#: Files and folders a run writes (what --overwrite clears; the cache is kept, its keys make it safe).
RUN_FILES = (FINETUNE_NAME, STATE_NAME, METRICS_NAME, PLOT_NAME, TB_DIR)
METRIC_COLUMNS = ("epoch", "train_loss", "dice_loss", "score_loss", "val_dice", "val_prompt_iou", "lr",
                  "seconds")


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------
def write_metrics_csv(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite metrics.csv from the history (atomically: each epoch appears exactly once)."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            for row in history:
                writer.writerow({k: "" if row.get(k) is None else row[k] for k in METRIC_COLUMNS})


#: (history key, marker style, colour, legend label) of the validation curves.
VAL_CURVES = (("val_dice", "s-", "tab:orange", "segmentation Dice (val)"),
              ("val_prompt_iou", "^-", "tab:green", "prompted IoU (val)"))


def history_figure(history: Sequence[Mapping[str, Any]], curves: Sequence[tuple[str, str, str, str]] = VAL_CURVES):
    """(figure, loss axis, score axis): the training loss on the left axis and the validation
    ``curves`` (epochs that have them) on the right one; the caller adds limits, legend, title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, [row["train_loss"] for row in history], "o-", color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax2 = ax.twinx()
    for key, style, colour, label in curves:
        val = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
        if val:
            ax2.plot(*zip(*val), style, color=colour, label=label)
    ax2.set_ylabel("validation score")
    return fig, ax, ax2


def plot_history(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """training.png: training loss (left axis), validation Dice and prompted IoU (right axis)."""
    import matplotlib.pyplot as plt

    fig, ax, ax2 = history_figure(history)
    ax2.set_ylim(0.0, 1.0)
    lines = ax.get_lines() + ax2.get_lines()
    ax2.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize="small")
    ax.set_title("SAM 2 fine-tuning")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def recorded_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The hyper-parameters (TrainConfig fields) saved in RUN_DIR/last.pt; None without one.

    Lets ``train --resume`` take every value the user does not repeat from the run itself.
    """
    path = Path(run_dir) / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return dict(state["run"]["config"])
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise MosaicError(f"{path}: cannot read the training state ({exc})") from exc


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data
