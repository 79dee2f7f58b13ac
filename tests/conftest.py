"""Shared pytest set-up. Fixtures live in their own modules, loaded here as plugins."""
pytest_plugins = ["fixtures_sam2", "fixtures_labelstudio", "fixtures_data"]


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _empty_weights_home(tmp_path_factory):
    """Tests see no SAM 2 weights unless they install some (the sam2_home fixture, or a test's own
    MOSAIC_SAM_HOME): weights the developer installed in the user cache must not change what
    "auto" picks or what a test measures."""
    import os

    previous = os.environ.get("MOSAIC_SAM_HOME")
    os.environ["MOSAIC_SAM_HOME"] = str(tmp_path_factory.mktemp("no_weights"))
    yield
    if previous is None:
        os.environ.pop("MOSAIC_SAM_HOME", None)
    else:
        os.environ["MOSAIC_SAM_HOME"] = previous
