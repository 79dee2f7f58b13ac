"""Driving Label Studio's editor in a real browser: Playwright with Debian's Chromium.

Plain helper code for the browser tests (no pytest fixtures here). Playwright is used only as a
driver for the Chromium that Debian installs at /usr/bin/chromium (``make chromium``): its own
browser downloads (``playwright install``) are never needed.

The editor (Label Studio Frontend, "LSF", classes ``lsf-...``) is driven as an annotator would:
buttons, toggles, hotkeys and clicks on the image. Two things are read from its state instead of
the page, because the page cannot show them reliably: where the image lies on the screen (LSF
zooms the image to the width it had before the toolbar was laid out, so part of it can sit under
the toolbar: the hidden ``<img>`` element carries the transform LSF maps clicks with), and the
number of regions (the region list is virtualised: only the rows on screen exist in the DOM).
"""
from __future__ import annotations

import importlib.util
import io
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page, Playwright

    from labelstudio_server import LabelStudioServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}
TIMEOUT_MS = 60_000  # per action: page loads take ~10 s on a busy 2-core machine
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Requests to anywhere but this machine (Label Studio's Sentry reporting) are dropped at once.
OFF_MACHINE = re.compile(r"^https?://(?!127\.0\.0\.1[:/])")

IMAGE = ".lsf-main-content img[alt=image]"
STAGE = ".lsf-main-content .konvajs-content"
AUTO_ANNOTATION = "[data-testid=bottombar-auto-annotation-toggle]"
ACCEPT_SUGGESTIONS = "[data-testid=bottombar-accept-suggestions-button]"
SUBMIT = "[data-testid=bottombar-submit-button]"
SMART_TOOLS = ".lsf-toolbar button.lsf-tool_smart:not([aria-label])"  # the "Auto-Detect" flyout
# LSF's annotation being edited; its regions are what the region list shows.
SELECTED_ANNOTATION = "window.dataManager.lsf.lsf.annotationStore.selected"


def browser_required() -> bool:
    """True when missing browser tooling must fail the tests: CI is set and Chromium is there."""
    return bool(os.environ.get("CI")) and CHROMIUM.exists()


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not CHROMIUM.exists():
        return f"Debian's chromium is not installed ({CHROMIUM}); `make chromium` installs it"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is not installed (pip install playwright; no browser download needed)"
    return None


def launch(playwright: Playwright, profile: Path) -> BrowserContext:
    """Headless Chromium with a fresh profile in ``profile``, off-machine requests blocked."""
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    context.route(OFF_MACHINE, lambda route: route.abort())
    return context


def login(page: Page, server: LabelStudioServer) -> None:
    """Log in through Label Studio's login form (/user/login)."""
    page.goto(f"{server.url}/user/login")
    page.fill("input[name=email]", server.username)
    page.fill("input[name=password]", server.password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    if "/user/login" in page.url:
        raise AssertionError(f"login as {server.username} failed: still on {page.url}")


def open_task(page: Page, server: LabelStudioServer, project: int, task: int) -> None:
    """Open a task as an annotator does: the project's Data Manager, then a click on the task's
    row; wait until the editor shows the image.

    (Going to /projects/<p>/data?task=<t> directly races in Label Studio 1.23: when the task list
    arrives after the task, its entry, which has no predictions, replaces the task, and the editor
    opens without pre-labels.)
    """
    page.goto(f"{server.url}/projects/{project}/data")
    rows = page.locator("[data-testid=table-row]")
    rows.first.wait_for()
    matching = [rows.nth(i) for i in range(rows.count()) if rows.nth(i).inner_text().split()[:1] == [str(task)]]
    if len(matching) != 1:
        raise AssertionError(f"project {project}: {len(matching)} rows for task {task} in the Data Manager")
    matching[0].get_by_text(str(task), exact=True).first.click()  # the ID cell comes first
    page.wait_for_url(re.compile(rf"[?&]task={task}(&|$)"))
    page.wait_for_selector(IMAGE, state="attached")
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }", arg=IMAGE)
    page.wait_for_selector(STAGE)


@dataclass
class ImageOnScreen:
    """Where the editor shows an image of ``width`` x ``height`` pixels, in page coordinates."""

    left: float
    top: float
    scale_x: float
    scale_y: float
    visible: dict[str, float]  # the stage's box: the part of the page the image can be seen in

    def point(self, x: float, y: float) -> tuple[float, float]:
        """Page coordinates of the centre of image pixel (x, y) = (column, row)."""
        return self.left + (x + 0.5) * self.scale_x, self.top + (y + 0.5) * self.scale_y

    def shows(self, x: float, y: float, margin: float = 20) -> bool:
        """True when image pixel (x, y) is on screen, at least ``margin`` page pixels inside."""
        px, py = self.point(x, y)
        v = self.visible
        return (v["x"] + margin <= px <= v["x"] + v["width"] - margin
                and v["y"] + margin <= py <= v["y"] + v["height"] - margin)


def image_on_screen(page: Page, width: int, height: int) -> ImageOnScreen:
    """The mapping from image pixels to page coordinates the editor uses for clicks."""
    box = page.locator(IMAGE).bounding_box()
    stage = page.locator(STAGE).bounding_box()
    if box is None or stage is None:
        raise AssertionError("the editor shows no image")
    return ImageOnScreen(box["x"], box["y"], box["width"] / width, box["height"] / height, stage)


def editor_regions(page: Page) -> list[dict[str, str]]:
    """The regions of the annotation open in the editor: [{"id", "type"}] (LSF's region store)."""
    return page.evaluate(f"() => {SELECTED_ANNOTATION}.regions.map(r => ({{id: r.cleanId, type: r.type}}))")


def wait_for_selected_region(page: Page, region_id: str) -> None:
    """Wait until region ``region_id`` (a result id) is selected in the editor."""
    page.wait_for_function(f"id => {SELECTED_ANNOTATION}.selectedRegions.some(r => r.cleanId === id)",
                           arg=region_id)


def wait_for_region_count(page: Page, count: int) -> None:
    """Wait until the annotation open in the editor holds ``count`` regions."""
    page.wait_for_function(f"n => {SELECTED_ANNOTATION}?.regions.length === n", arg=count)


def enable_auto_annotation(page: Page) -> None:
    """Switch on the bottom bar's "Auto-Annotation" toggle (interactive pre-annotations)."""
    toggle = page.locator(AUTO_ANNOTATION)
    if not toggle.is_checked():
        page.get_by_text("Auto-Annotation", exact=True).click()
    page.wait_for_function("s => document.querySelector(s).checked", arg=AUTO_ANNOTATION)


def choose_smart_tool(page: Page, tool: str) -> None:
    """Pick a smart tool (e.g. "key-point-tool") from the toolbar's "Auto-Detect" flyout."""
    page.hover(SMART_TOOLS)
    page.click(f".lsf-toolbar__smart [aria-label={tool}]")
    page.mouse.move(0, 0)  # close the flyout, which would cover the image
    page.wait_for_selector(f".lsf-toolbar__smart [aria-label={tool}].lsf-tool_active", state="attached")


def label_hotkey(label_config: str, control_tag: str) -> str:
    """The hotkey LSF gives the first label of the first ``control_tag`` (e.g. "KeyPointLabels"):
    labels are numbered 1, 2, ... in the order they appear in the config."""
    labels = [(parent.tag, label) for parent in ET.fromstring(label_config).iter()
              for label in parent if label.tag == "Label"]
    for number, (tag, label) in enumerate(labels, start=1):
        if tag == control_tag:
            return label.get("hotkey") or str(number)
    raise AssertionError(f"label_config.xml: no <Label> inside a <{control_tag}>")


def screenshot(page: Page, name: str) -> Path:
    """Save a screenshot of the page as tests/artifacts/<name>.png (kept for a person to look at)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def small_png(source: Path, target: Path, clip: dict[str, float], width: int = 960,
              colours: int = 128) -> int:
    """Write the ``clip`` box of the screenshot ``source`` to ``target``, scaled to ``width`` pixels
    and reduced to a palette, for the README; return its size in bytes."""
    with Image.open(source) as im:
        box = tuple(round(v) for v in (clip["x"], clip["y"], clip["x"] + clip["width"], clip["y"] + clip["height"]))
        part = im.convert("RGB").crop(box)
    part = part.resize((width, round(part.height * width / part.width)), Image.LANCZOS)
    buffer = io.BytesIO()
    part.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        buffer, "PNG", optimize=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())

