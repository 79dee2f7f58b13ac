"""A photograph with an EXIF orientation, clicked in Label Studio's editor with the view rotated.

Real Label Studio 1.23.2, the backend on the classical engine and Chromium (as in
test_browser_labelstudio.py, whose fixtures this module uses). The image is a JPEG stored turned
(300 x 400) with EXIF orientation 6, so the browser, and so the editor, shows it 400 x 300; the
project's Image tag has ``rotateControl``. The annotator turns the view with the editor's
rotate-right button (once, twice or three times), clicks a tessera with the smart keypoint tool, accepts the backend's mask
and submits. Checked:

* the browser shows the displayed frame (``naturalWidth`` x ``naturalHeight`` = 400 x 300) and
  the click Label Studio sends carries ``image_rotation`` 90, 180 or 270 with its x, y in the image's own
  (displayed) frame, at the clicked tessera: Label Studio maps clicks on a rotated view back to
  the image, so no mapping is needed on our side (the claim tests/test_orientation.py rests on);
* the backend's answer is exactly the classical tessera under the click on the image as
  ``imageio`` reads it (EXIF applied);
* the stored brush region carries that ``image_rotation`` and exports (``export_dataset``) to that
  same tessera, in the displayed frame.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from browser_helpers import (ACCEPT_SUGGESTIONS, IMAGE, STAGE, choose_smart_tool, enable_auto_annotation,
                             label_hotkey, open_task)
from mosaic_toolkit.core import imageio
from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.core.dataset import Dataset
from mosaic_toolkit.data.export import export_dataset, folder_resolver, rasterise_region
from mosaic_toolkit.segment import segment_image
from mosaic_toolkit.data.synth import synth_mosaic
from mosaic_toolkit.core.tiling import segment_tiled
from test_browser_labelstudio import (CLICK_TOLERANCE_PX, HEIGHT, LABEL_CONFIG, TESSERA_SIZE, WIDTH,  # noqa: F401
                                      backend, browser, central_tessera, connect, page, pytestmark, submit)

# The view can be turned (rotateControl); no PolygonLabels, so a click is answered with a brush mask,
# compared pixel for pixel with the classical engine's tessera.
ROTATE_CONFIG = re.sub(r"\s*<PolygonLabels.*?</PolygonLabels>", "", LABEL_CONFIG.replace(
    'contrastControl="true"/>', 'contrastControl="true" rotateControl="true"/>'), flags=re.S)
SEED = 3


def rotated_point(box: dict, rotation: int, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of image point (x, y) when the editor shows the image turned clockwise by
    ``rotation`` degrees inside ``box`` (the turned image's bounding box on the page)."""
    sideways = rotation in (90, 270)
    scale = box["width"] / (HEIGHT if sideways else WIDTH)
    px, py = {0: (x, y), 90: (HEIGHT - y, x), 180: (WIDTH - x, HEIGHT - y), 270: (y, WIDTH - x)}[rotation]
    return box["x"] + px * scale, box["y"] + py * scale


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_click_on_a_rotated_view_of_an_exif_photo(label_studio, backend, page, tmp_path, rotation) -> None:
    """The view turned by 90, 180 or 270 degrees (1, 2 or 3 presses of rotate-right)."""
    assert "rotateControl" in ROTATE_CONFIG
    client = label_studio.client()
    project = client.projects.create(title=f"browser: rotated {rotation}", label_config=ROTATE_CONFIG,
                                     show_collab_predictions=False)
    folder = label_studio.document_root / f"browser-{project.id}"
    label_studio.add_local_storage(project.id, folder)
    image, truth = synth_mosaic(np.random.default_rng(SEED), WIDTH, HEIGHT, style="opus", tessera_size=TESSERA_SIZE,
                                realism=0)
    exif = Image.Exif()
    exif[imageio.ORIENTATION_TAG] = 6  # stored turned anticlockwise, shown upright
    path = folder / "turned.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(image, 1))).save(path, exif=exif, quality=95)
    assert Image.open(path).size == (HEIGHT, WIDTH)
    [task_id] = client.projects.import_tasks(
        id=project.id, request=[{"image": label_studio.local_file_url(path)}], return_task_ids=True).task_ids
    connect(label_studio, backend, project.id)
    displayed = imageio.read_image(path)
    classical = segment_image(ClassicalEngine(), displayed)  # as the backend segments: one scale per image
    tessera, x, y = central_tessera(truth)
    assert classical[y, x] > 0, "the classical engine puts the chosen point on grout"
    expected = classical == classical[y, x]

    open_task(page, label_studio, project.id, task_id)
    natural = page.evaluate("s => { const i = document.querySelector(s); return [i.naturalWidth, i.naturalHeight]; }", IMAGE)
    assert natural == [WIDTH, HEIGHT]  # the browser applies the EXIF orientation, as imageio does
    for _ in range(rotation // 90):
        page.click("[aria-label=rotate-right]")
    page.wait_for_function("([s, r]) => document.querySelector(s).style.transform.includes(`rotate(${r}deg)`)",
                           arg=[IMAGE, rotation])
    enable_auto_annotation(page)
    choose_smart_tool(page, "key-point-tool")
    page.keyboard.press(label_hotkey(ROTATE_CONFIG, "KeyPointLabels"))
    box = page.locator(IMAGE).bounding_box()
    shown = HEIGHT / WIDTH if rotation in (90, 270) else WIDTH / HEIGHT
    assert abs(box["width"] / box["height"] - shown) < 0.02, box  # shown turned
    px, py = rotated_point(box, rotation, x + 0.5, y + 0.5)
    stage = page.locator(STAGE).bounding_box()
    assert stage["x"] < px < stage["x"] + stage["width"] and stage["y"] < py < stage["y"] + stage["height"]
    with page.expect_response(lambda r: "/interactive-annotating" in r.url) as answer:
        page.mouse.click(px, py)
    response = answer.value
    assert response.status == 200, response.text()
    [prompt] = response.request.post_data_json["context"]["result"]
    assert prompt["image_rotation"] == rotation
    assert (prompt["original_width"], prompt["original_height"]) == (WIDTH, HEIGHT)
    sent_x, sent_y = prompt["value"]["x"] / 100 * WIDTH, prompt["value"]["y"] / 100 * HEIGHT
    assert abs(sent_x - (x + 0.5)) <= CLICK_TOLERANCE_PX and abs(sent_y - (y + 0.5)) <= CLICK_TOLERANCE_PX, \
        (sent_x, sent_y, x, y)  # in the image's own frame, not the turned view's
    [suggested] = response.json()["data"]["result"]
    np.testing.assert_array_equal(rasterise_region(task_id, suggested, WIDTH, HEIGHT), expected)

    page.wait_for_selector(ACCEPT_SUGGESTIONS)
    page.click(ACCEPT_SUGGESTIONS)
    page.wait_for_selector(".lsf-tree__node_type_brushregion")
    submit(page, task_id)

    [task] = [t for t in client.projects.exports.as_json(project.id) if t["id"] == task_id]
    [brush] = [r for r in task["annotations"][0]["result"] if r["type"] == "brushlabels"]
    assert brush["image_rotation"] == rotation and (brush["original_width"], brush["original_height"]) == (WIDTH, HEIGHT)
    summary = export_dataset([task], folder_resolver(folder), tmp_path / "ds")
    data = Dataset.open(tmp_path / "ds")
    [sample] = summary.samples
    assert data.samples[0].orientation == 6
    np.testing.assert_array_equal(data.instances(sample) > 0, expected)
