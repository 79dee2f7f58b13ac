"""The `mosaic-toolkit` command line: one module per command, each a thin layer over the library.

Commands are imported only when run, so `mosaic-toolkit --help` stays fast (no torch import).
"""
from __future__ import annotations

import importlib
import logging

import click

from .. import __version__

# command name -> (module under mosaic_toolkit.cli, short help shown by `mosaic-toolkit --help`)
COMMANDS = {
    "synth": ("synth", "Generate synthetic mosaics with exact ground truth."),
    "export": ("export", "Turn Label Studio annotations into a ground-truth dataset."),
    "tasks": ("tasks", "Cut large mosaics into Label Studio tasks of a few hundred tesserae."),
    "prelabel": ("prelabel", "Pre-annotate every task of a Label Studio project (resumable)."),
    "augment": ("augment", "Crop, rotate and flip a dataset; split it per source mosaic."),
    "eval": ("evaluate", "Score predicted masks against ground truth (pixel and per-tessera)."),
    "weights": ("weights", "List, download and locate SAM 2 checkpoints."),
    "segment": ("segment", "Segment every tessera of images (SAM 2 or classical engine)."),
    "train": ("train", "Fine-tune SAM 2's prompt encoder and mask decoder on a dataset."),
    "tune": ("tune", "Search the mask generator's thresholds with Optuna."),
    "stats": ("stats", "Measure every tessera and write a mosaic report."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
        return module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mosaic-toolkit")
@click.option("-v", "--verbose", is_flag=True, help="Log debugging details to stderr.")
def main(verbose: bool) -> None:
    """Digitise mosaics by segmenting every tessera.

    Typical flow: export (or synth) -> augment -> train -> tune -> segment -> eval.
    Every dataset folder follows the dataset contract in docs/user-guide.md.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
