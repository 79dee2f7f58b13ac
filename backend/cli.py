"""`mosaic-backend`: run the Label Studio ML backend (uvicorn).

Every setting of ``config.Settings`` is an option here and an environment variable; an option
given on the command line wins over the environment, which wins over the default. The resolved
values are put into the environment of the server processes, which read ``Settings.from_env``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import click

from mosaic_toolkit.cli.options import handle_errors

from . import __version__
from .config import Settings

_TYPES = {"int": int, "float": float, "int | None": int}


def _option(f: dataclasses.Field) -> Any:
    """A click option for one Settings field (its env var, default and help text)."""
    meta = f.metadata
    default = None if f.default is dataclasses.MISSING else f.default
    if f.default_factory is not dataclasses.MISSING:
        default = json.dumps(f.default_factory())
    kind: Any = _TYPES.get(str(f.type), str)
    if meta["choices"]:
        kind = click.Choice(meta["choices"])
    elif str(f.type) == "bool":
        kind = click.BOOL
    elif str(f.type) == "Path":
        kind = click.Path(file_okay=False, path_type=Path)
    elif str(f.type) == "Path | None":
        kind = click.Path(path_type=Path)
    return click.option(
        f"--{f.name.replace('_', '-')}", f.name, type=kind, default=default, envvar=meta["env"],
        show_envvar=True, show_default=not meta["secret"] and default is not None, help=meta["help"])


def _to_env(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else os.fspath(value) if isinstance(value, Path) else str(value)


def _command(**values: Any) -> None:
    """Serve Label Studio's ML backend protocol: interactive clicks (SAM 2 or the classical
    engine), per-tessera pre-labels, training runs started from Label Studio.

    Connect it in Label Studio under Project -> Settings -> Model with the URL
    http://<host>:<port> and "Interactive preannotations" on.
    """
    import uvicorn

    for f in dataclasses.fields(Settings):
        text = _to_env(values[f.name])
        if text is None:
            os.environ.pop(f.metadata["env"], None)
        else:
            os.environ[f.metadata["env"]] = text
    settings = Settings.from_env()  # checks every value before anything is loaded
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1:
        uvicorn.run("mosaic_backend.app:create_app_from_env", factory=True, host=settings.host,
                    port=settings.port, workers=settings.workers, log_level=settings.log_level)
        return
    from .app import create_app

    app = create_app(settings)  # loads the model now, before the first request
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


command = _command
for _field in reversed(dataclasses.fields(Settings)):
    command = _option(_field)(command)
command = click.version_option(__version__, prog_name="mosaic-backend")(command)
command = click.command("mosaic-backend", context_settings={"help_option_names": ["-h", "--help"]})(
    handle_errors(command))


def main() -> None:
    """Console entry point."""
    command()
