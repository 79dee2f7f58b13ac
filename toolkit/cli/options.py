"""Options and helpers shared by the commands."""
from __future__ import annotations

import functools

import click

from ..core.errors import MosaicError


def overwrite_option(f):
    return click.option(
        "--overwrite",
        is_flag=True,
        help="Replace OUT if it exists (only once the new output is complete).",
    )(f)


def seed_option(default: int = 0):
    return click.option(
        "--seed", type=int, default=default, show_default=True,
        help="Random seed; the same seed gives byte-identical output.",
    )


def handle_errors(f):
    """Turn MosaicError into a one-line message on stderr and exit status 1."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except MosaicError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper
