"""`mosaic-toolkit export` over malformed Label Studio exports (issue 12, finding 6).

Every malformed field is a one-line error naming the task, exit status 1, no traceback and no
output folder; an RLE's declared length is checked before it is decoded. Ends with a
hypothesis fuzz test over generated malformed exports.
"""
from __future__ import annotations

import copy
import itertools
import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from mosaic_toolkit.cli import main
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.data.export import rasterise_region

W, H = 6, 5


def valid_task() -> dict[str, Any]:
    mask = np.zeros((H, W), np.uint8)
    mask[1:3, 1:4] = 255
    brush = {"id": "b1", "type": "brushlabels", "from_name": "brush", "to_name": "image",
             "original_width": W, "original_height": H, "image_rotation": 0,
             "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Tessera"]}}
    poly = {"id": "p1", "type": "polygonlabels", "from_name": "polygon", "to_name": "image",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"points": [[60, 60], [95, 60], [95, 95]], "polygonlabels": ["Tessera"]}}
    return {"id": 7, "data": {"image": "/data/upload/1/i.png"}, "project": 1,
            "annotations": [{"id": 1, "result": [brush, poly], "was_cancelled": False,
                             "ground_truth": False, "updated_at": "2024-01-01T10:00:00Z"}]}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "i.png")
    return tmp_path


def run_export(folder: Path, tasks: Any, out_name: str = "out"):
    path = folder / "export.json"
    path.write_text(json.dumps(tasks))
    result = CliRunner().invoke(main, ["export", str(path), "--images", str(folder), "--out", str(folder / out_name)])
    return result, folder / out_name


def assert_clean_failure(result, out: Path, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught error
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return lines[0]


def test_the_valid_export_works(folder) -> None:
    result, out = run_export(folder, [valid_task()])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()


def _set(task: dict, path: tuple, value: Any) -> dict:
    task = copy.deepcopy(task)
    node = task
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return task


MALFORMED = [
    ("annotations a string", ("annotations",), "x", "annotations"),
    ("annotation not an object", ("annotations", 0), [1], "annotation"),
    ("result of numbers", ("annotations", 0, "result"), [1, 2], "result"),
    ("result a string", ("annotations", 0, "result"), "abc", "result"),
    ("type a list", ("annotations", 0, "result", 0, "type"), ["brushlabels"], "type"),
    ("value a list", ("annotations", 0, "result", 0, "value"), [1], "value"),
    ("labels a number", ("annotations", 0, "result", 0, "value", "brushlabels"), 5, "brushlabels"),
    ("rle negative", ("annotations", 0, "result", 0, "value", "rle"), [-1, -5, -300, 2, 7, 9, 1, 1], "RLE"),
    ("rle too large numbers", ("annotations", 0, "result", 0, "value", "rle"), [0, 0, 0, 120, 300, 1e9, 4, 4], "RLE"),
    ("rle a string", ("annotations", 0, "result", 0, "value", "rle"), "AAAA", "RLE"),
    ("rle out of byte range", ("annotations", 0, "result", 0, "value", "rle"),
     [0, 0, 0, 120, 197, 114, 10, 188, 66, 297, -77, 216, -158, -12, -157, -203, -44], "RLE"),
    ("rle of floats", ("annotations", 0, "result", 0, "value", "rle"), [0.5] * 10, "RLE"),
    ("width not a number", ("annotations", 0, "result", 0, "original_width"), "x", "original_width"),
    ("width NaN-like", ("annotations", 0, "result", 0, "original_width"), 1e308, "original_width"),
    ("points ragged", ("annotations", 0, "result", 1, "value", "points"), [[1, 2], [3]], "points"),
    ("points strings", ("annotations", 0, "result", 1, "value", "points"), "abc", "points"),
    ("timestamp not a string", ("annotations", 0, "updated_at"), {"a": 1}, "timestamp"),
    ("image reference a list", ("data", "image"), ["/data/upload/1/i.png"], "image"),
    ("image reference not a URL", ("data", "image"), "http://[::1", "image"),
]


@pytest.mark.parametrize("path,value,fragment", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_fields_are_one_line_errors_naming_the_task(folder, path, value, fragment) -> None:
    result, out = run_export(folder, [_set(valid_task(), path, value)])
    assert_clean_failure(result, out, "task 7", fragment)


@pytest.mark.parametrize("tid", ["../../escape", {"a": 1}, [1], None, True, 1.5])
def test_task_ids_must_be_integers_or_plain_names(folder, tid) -> None:
    result, out = run_export(folder, [_set(valid_task(), ("id",), tid)])
    assert_clean_failure(result, out, "task id")
    assert not (folder.parent / "escape").exists()


def test_rle_length_is_checked_before_decoding() -> None:
    """55 KB declaring 2^30 values is refused from its header, without allocating the 1 GB."""
    rle = [0x40, 0, 0, 0] + [0xFF] * 55_000  # header: 2^30 values
    region = {"id": "r", "type": "brushlabels", "value": {"rle": rle, "brushlabels": ["Tessera"]}}
    tracemalloc.start()
    try:
        with pytest.raises(MosaicError, match=r"task 3: region r: brush RLE declares 1073741824 values, expected 120"):
            rasterise_region(3, region, W, H)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak


# --------------------------------------------------------------------------------------------
# Fuzz: generated malformed exports
# --------------------------------------------------------------------------------------------
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["brushlabels", "polygonlabels", "labels", "rle", "", "..", "x" * 300]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, prefix + (i,))
    return out


VALID_PATHS = _paths(valid_task())
_runs = itertools.count()


@st.composite
def malformed_exports(draw) -> Any:
    task = valid_task()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(VALID_PATHS))
        action = draw(st.sampled_from(["replace", "delete", "extra"]))
        try:
            node = task
            for key in path[:-1]:
                node = node[key]
            if action == "replace":
                node[path[-1]] = draw(JUNK)
            elif action == "delete" and isinstance(node, dict):
                node.pop(path[-1], None)
            elif isinstance(node, dict):
                node[draw(st.text(max_size=6))] = draw(JUNK)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed this path
    tasks: Any = [task]
    if draw(st.integers(0, 9)) == 0:
        tasks = draw(JUNK)  # not even a list of tasks
    return tasks


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(tasks=malformed_exports())
def test_fuzz_export_never_crashes(folder, tasks) -> None:
    """Exit 0 with a dataset, or exit 1 with one line and no output: never a traceback."""
    out_name = f"out{next(_runs)}"  # a fresh output folder for every example
    result, out = run_export(folder, tasks, out_name)
    if result.exit_code == 0:
        assert (out / "manifest.json").is_file(), result.output
    else:
        assert_clean_failure(result, out)
