"""A real Label Studio server for end-to-end tests.

The session-scoped fixture `label_studio` installs Label Studio into its own venv if needed
(see labelstudio_server.py), starts one server for the whole test session and stops it at the end.
Mark tests that use it with @pytest.mark.labelstudio.

If the install or the start fails, the tests FAIL when the environment variable CI is set or
MOSAIC_REQUIRE_LS=1 (so a broken set-up cannot pass unnoticed), and are skipped with the reason
otherwise (e.g. a laptop without network access).
"""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from labelstudio_server import LabelStudioError, LabelStudioServer, ensure_installed


def _label_studio_required() -> bool:
    """True when a missing Label Studio must fail the tests instead of skipping them."""
    return bool(os.environ.get("CI")) or os.environ.get("MOSAIC_REQUIRE_LS") == "1"


@pytest.fixture(scope="session")
def label_studio() -> Iterator[LabelStudioServer]:
    """A running Label Studio server (fresh data folder, admin user, API token) for the session."""
    try:
        server = LabelStudioServer(ensure_installed()).start()
    except LabelStudioError as exc:
        message = f"Label Studio is not available: {exc}"
        if _label_studio_required():
            pytest.fail(message, pytrace=False)
        pytest.skip(message + " (set MOSAIC_REQUIRE_LS=1 to make this a failure)")
    print(f"\nLabel Studio server at {server.url} started in {server.startup_seconds:.1f} s")
    try:
        yield server
    finally:
        server.stop()
