"""What an annotator waits for in Label Studio's editor: a large mosaic as one task vs tiled tasks.

A synthetic mosaic of about 2,000 tesserae is pre-labelled from its ground truth with light
polygons (``mosaic_toolkit.data.tasks.polygon_results`` at the fineness ``--iou``, default 0.97;
``--lean`` strips each result to fewer fields and 2-decimal points, see lean()) and imported
into a real Label Studio 1.23.2 (tests/labelstudio_server.py) twice:

(a) as one task holding the whole mosaic and one prediction of all its tesserae;
(b) as tiled tasks of at most ``--max-tesserae`` (300) tesserae (``mosaic_toolkit.data.tasks``), each
    with the prediction of its crop.

Headless Debian Chromium (Playwright, tests/browser_helpers.py) opens each task from the Data
Manager as an annotator does, and this measures:

* ``open_s``: from the click on the task's row until the annotation holds every pre-labelled
  region, the page has painted two more frames and the main thread has finished its work: the
  end of the last long task before a quiet second (the editor can reach its full region count
  and paint while it still has seconds of work queued, which the next click then waits for);
* ``regions_at_s``: when the annotation first held every region (the earlier, optimistic figure);
* ``longest_freeze_s``: the longest main-thread task (PerformanceObserver "longtask") meanwhile;
* ``submit_s``: from the click on Submit until Label Studio answered 201 (the stored annotation
  is then read back and its region count checked);
* ``tab_rss_mib``: resident memory of the tab's renderer process after opening (/proc);
* ``load_average``: the machine's 1/5/15-minute load averages then (the 2 cores are shared).

With ``--clicks N`` it also clicks N tesserae of a 720 x 640 crop of about 420 tesserae (no
pre-labels) with the smart keypoint tool, the backend (classical engine, uvicorn in a thread)
answering each click with a light polygon that is accepted, and records the tab's RSS, the time
and the load average every 25 clicks. Before each click it makes sure the keypoint label is
selected (pressing its hotkey blindly toggled it off after 20-30 clicks, and the editor then
sent nothing). A click the editor still sends nothing for (2-3 in 300) is skipped and
counted; five in a row stop the run with ``stalled_after_clicks``, the editor's state and a
screenshot.

Prints one JSON object. Usage (about 3 minutes on 2 cores, 3 more for 300 clicks)::

    python bench/bench_browser.py [--tesserae 2000] [--max-tesserae 300] [--tiles 2] [--iou 0.97] [--lean]
    python bench/bench_browser.py --only-clicks --clicks 300
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser_helpers import (ACCEPT_SUGGESTIONS, STAGE, SUBMIT, choose_smart_tool, enable_auto_annotation,  # noqa: E402
                             image_on_screen, label_hotkey, launch, login, open_task)
from labelstudio_server import LabelStudioServer, ensure_installed  # noqa: E402

from mosaic_toolkit.data.synth import synth_mosaic  # noqa: E402
from mosaic_toolkit.core.polygons import DEFAULT_IOU  # noqa: E402
from mosaic_toolkit.data.tasks import CROP_KEY, crop_instances, make_tasks, polygon_results  # noqa: E402

LABEL_CONFIG = (ROOT / "label_config.xml").read_text()
SELECTED = "window.dataManager?.lsf?.lsf?.annotationStore?.selected"
WAIT_MS = 300_000
QUIET_MS = 1000
LONGTASKS = """
window.__longtasks = [];
try {
  new PerformanceObserver(list => { for (const e of list.getEntries()) window.__longtasks.push([e.startTime, e.duration]); })
    .observe({type: 'longtask', buffered: true});
} catch (e) {}
"""


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (as `uptime` prints them): the machine is shared."""
    return [round(v, 2) for v in os.getloadavg()]


def renderer_rss_mib() -> float:
    """The largest resident set of the Chromium renderer processes started by this process."""
    me = os.getpid()

    def ancestors(pid: int):
        while pid > 1:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return
            pid = int(stat.rsplit(")", 1)[1].split()[1])
            yield pid

    best = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()  # Chromium rewrites it as one string
            if b"--type=renderer" not in cmdline or me not in set(ancestors(int(entry.name))):
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return round(best, 1)


def measure(page, server: LabelStudioServer, project: int, task: int, regions: int, submit: bool = True) -> dict:
    """Open ``task`` from the Data Manager, wait until its ``regions`` are painted, submit."""
    page.goto(f"{server.url}/projects/{project}/data")
    rows = page.locator("[data-testid=table-row]")
    rows.first.wait_for()
    [row] = [rows.nth(i) for i in range(rows.count()) if rows.nth(i).inner_text().split()[:1] == [str(task)]]
    started = page.evaluate("performance.now()")
    row.get_by_text(str(task), exact=True).first.click()
    page.wait_for_function(f"n => {SELECTED}?.regions?.length === n", arg=regions, timeout=WAIT_MS)
    painted = page.evaluate(
        "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(performance.now()))))")
    # settled: no long task for QUIET_MS (the last one's end is when the editor finished)
    settled = page.evaluate("""([started, quiet]) => new Promise(resolve => {
        const last = () => Math.max(started, ...window.__longtasks.map(([s, d]) => s + d));
        const poll = () => performance.now() - last() >= quiet ? resolve(last()) : setTimeout(poll, 100);
        poll(); })""", [started, QUIET_MS])
    freezes = [d for s, d in page.evaluate("window.__longtasks") if s + d >= started]
    rss = renderer_rss_mib()
    figures = {"task": task, "regions": regions, "open_s": round((max(painted, settled) - started) / 1000, 2),
               "regions_at_s": round((painted - started) / 1000, 2),
               "longest_freeze_s": round(max(freezes, default=0) / 1000, 2), "submit_s": None,
               "tab_rss_mib": rss, "load_average": load_average()}
    if not submit:
        return figures
    t0 = time.perf_counter()
    with page.expect_response(lambda r: r.request.method == "POST" and f"/api/tasks/{task}/annotations" in r.url,
                              timeout=WAIT_MS) as answer:
        page.click(SUBMIT)
    figures["submit_s"] = round(time.perf_counter() - t0, 2)
    assert answer.value.status == 201, answer.value.text()
    [annotation] = server.client().annotations.list(id=task)
    assert len(annotation.result) == regions, (len(annotation.result), regions)
    return figures


KEYPOINT_LABEL_SELECTED = f"() => {SELECTED}.names.get('keypoint').selectedLabels.length > 0"


def select_label(page, hotkey: str) -> None:
    """Make sure the keypoint control's label is selected. Its hotkey toggles it, and whether
    Escape (after accepting a suggestion) also drops it depends on timing, so pressing the hotkey
    blindly after every click left the label off after 20-30 clicks: the editor then makes no
    smart keypoint and sends nothing to the backend."""
    if not page.evaluate(KEYPOINT_LABEL_SELECTED):
        page.keyboard.press(hotkey)
        page.wait_for_function(KEYPOINT_LABEL_SELECTED, timeout=10_000)


def measure_clicks(page, server: LabelStudioServer, image: np.ndarray, truth: np.ndarray, clicks: int,
                   tmp: Path) -> dict:
    """Click ``clicks`` tesserae of a crop with the smart keypoint tool; accept each polygon."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    from mosaic_backend.config import Settings
    from mosaic_toolkit.core.dataset import tessera_points
    from test_backend_labelstudio import BackendServer

    client = server.client()
    project = client.projects.create(title="clicks", label_config=LABEL_CONFIG, show_collab_predictions=False)
    folder = server.document_root / f"clicks-{project.id}"
    server.add_local_storage(project.id, folder)
    # 720 x 640 pixels: at the editor's 1440 x 900 window the whole crop is on screen (a taller
    # one runs under the bottom bar) and it holds about 420 tesserae, over 300 clickable
    height, width = 640, 720
    crop, labels = image[:height, :width], crop_instances(truth, (0, 0, height, width))
    Image.fromarray(np.ascontiguousarray(crop)).save(folder / "crop.png")
    [task] = client.projects.import_tasks(id=project.id, request=[{"image": server.local_file_url(folder / "crop.png")}],
                                          return_task_ids=True).task_ids
    settings = Settings.from_env({}, engine="classical", models_dir=tmp / "models")
    out: dict = {"tesserae_in_crop": int(len(np.unique(labels)) - 1), "rss_mib": {}, "elapsed_s": {}, "load_average": {}}
    with BackendServer(settings) as backend:
        ml = client.ml.create(url=backend.url, project=project.id, is_interactive=True, title="mosaic-sam")
        assert ml.state == "CO", ml.error_message
        open_task(page, server, project.id, task)
        out["rss_mib"]["0"] = renderer_rss_mib()
        out["load_average"]["0"] = load_average()
        enable_auto_annotation(page)
        choose_smart_tool(page, "key-point-tool")
        hotkey = label_hotkey(LABEL_CONFIG, "KeyPointLabels")
        select_label(page, hotkey)
        screen = image_on_screen(page, width, height)
        points = [p for p in tessera_points(labels) if screen.shows(*p)]
        # only points where the page shows the image itself (not the bottom bar or a toolbar over it)
        on_stage = page.evaluate(
            "([s, pts]) => pts.map(([x, y]) => !!document.elementFromPoint(x, y)?.closest(s))",
            [STAGE, [screen.point(x, y) for x, y in points]])
        points = [p for p, shown in zip(points, on_stage) if shown]
        out["tesserae_on_screen"] = len(points)
        started = time.perf_counter()
        done = 0
        missed = in_a_row = 0
        for x, y in points:
            if done >= clicks:
                break
            try:
                with page.expect_response(lambda r: "/interactive-annotating" in r.url, timeout=15_000) as answer:
                    page.mouse.click(*screen.point(x, y))
                ok = answer.value.status == 200 and answer.value.json()["data"]["result"]
            except PlaywrightTimeout:  # the editor sent no request for this click
                ok = False
            if not ok:
                missed += 1
                in_a_row += 1
                print(f"click {done + missed}: no answer", file=sys.stderr, flush=True)
                if in_a_row >= 5:  # the editor has stopped sending clicks: say so, stop
                    out["stalled_after_clicks"] = done
                    shot = tmp.parent / "bench_browser_stalled.png"
                    page.screenshot(path=str(shot))
                    px, py = screen.point(x, y)
                    out["stalled_state"] = page.evaluate(
                        """([px, py]) => {
                          const a = window.dataManager.lsf.lsf.annotationStore.selected;
                          const e = document.elementFromPoint(px, py);
                          return {element: e && (e.tagName + '.' + e.className),
                                  active: document.activeElement && (document.activeElement.tagName + '.' + document.activeElement.className),
                                  tools: [...document.querySelectorAll('.lsf-tool_active')].map(t => t.getAttribute('aria-label')),
                                  labels: a.names.get('keypoint').selectedLabels.map(l => l.value),
                                  regions: a.regions.map(r => r.type).reduce((c, t) => (c[t] = (c[t] || 0) + 1, c), {}),
                                  selected: a.selectedRegions.length, scroll: [window.scrollX, window.scrollY]};
                        }""", [px, py])
                    print(json.dumps(out["stalled_state"]), file=sys.stderr)
                    print(f"the editor stopped sending clicks after {done}; screenshot {shot}", file=sys.stderr)
                    break
                page.keyboard.press("Escape")
                select_label(page, hotkey)
                continue
            in_a_row = 0
            page.click(ACCEPT_SUGGESTIONS)
            done += 1
            page.wait_for_function(f"n => {SELECTED}.regions.filter(r => r.type === 'polygonregion').length >= n",
                                   arg=done, timeout=WAIT_MS)
            page.keyboard.press("Escape")  # deselect the accepted region; the keypoint tool stays
            select_label(page, hotkey)
            if done % 25 == 0:
                out["rss_mib"][str(done)] = renderer_rss_mib()
                out["elapsed_s"][str(done)] = round(time.perf_counter() - started, 1)
                out["load_average"][str(done)] = load_average()
                print(f"{done} clicks: {out['rss_mib'][str(done)]} MiB", file=sys.stderr, flush=True)
        out["clicks"] = done
        out["clicks_without_answer"] = missed
        out["seconds_per_click"] = round((time.perf_counter() - started) / max(done, 1), 2)
        out["rss_mib"][str(done)] = renderer_rss_mib()
        out["load_average"][str(done)] = load_average()
    return out


def lean(results: list[dict]) -> list[dict]:
    """``--lean``: each result with only what Label Studio itself stores for a polygon drawn in
    its editor, less ``image_rotation`` (0 by default) and ``readonly`` (false by default), its
    percentages rounded to 2 decimals instead of 4 (0.01 % of a 600-px crop is 0.06 px)."""
    keep = ("id", "from_name", "to_name", "type", "original_width", "original_height")
    return [{**{k: r[k] for k in keep},
             "value": {"points": [[round(x, 2), round(y, 2)] for x, y in r["value"]["points"]],
                       "closed": True, "polygonlabels": r["value"]["polygonlabels"]}} for r in results]


def prepare(server: LabelStudioServer, image: np.ndarray, truth: np.ndarray, args: argparse.Namespace,
            tmp: Path, result: dict) -> list[tuple[str, int, int, int]]:
    """Import (a) the whole mosaic and (b) its tiled tasks; return what to open:
    (kind, project, task, regions), the fullest tiles first, then the whole mosaic."""
    client = server.client()
    whole = client.projects.create(title="whole mosaic", label_config=LABEL_CONFIG)
    folder = server.document_root / f"whole-{whole.id}"
    server.add_local_storage(whole.id, folder)
    Image.fromarray(image).save(folder / "mosaic.png")
    regions = polygon_results(truth, args.iou)
    if args.lean:
        regions = lean(regions)
    prediction = {"model_version": "ground-truth", "result": regions}
    # --as-annotation: the regions as an annotation of the task (the editor opens it as it is)
    # instead of a prediction (the editor loads it, then copies it into a new annotation)
    key, item = ("annotations", {"result": regions}) if args.as_annotation else ("predictions", prediction)
    [whole_task] = client.projects.import_tasks(
        id=whole.id, request=[{"data": {"image": server.local_file_url(folder / "mosaic.png")},
                               key: [item]}], return_task_ids=True).task_ids
    result["whole"] = {"prediction_kb": round(len(json.dumps(prediction)) / 1024),
                       "vertices_per_region": float(np.median([len(r["value"]["points"]) for r in regions]))}
    tiled = client.projects.create(title="tiled mosaic", label_config=LABEL_CONFIG)
    out = server.document_root / f"tiles-{tiled.id}"
    Image.fromarray(image).save(tmp / "mosaic.png")
    tasks = make_tasks([tmp / "mosaic.png"], out, max_tesserae=args.max_tesserae,
                       tessera_size=float(2 * np.sqrt(np.median(np.bincount(truth.ravel())[1:]) / np.pi)),
                       document_root=server.document_root, progress=False)
    server.add_local_storage(tiled.id, out)
    counts = []
    for task in tasks:
        meta = task["meta"][CROP_KEY]
        labels = crop_instances(truth, (meta["y"], meta["x"], meta["y"] + meta["height"], meta["x"] + meta["width"]))
        results = polygon_results(labels, args.iou)
        results = lean(results) if args.lean else results
        if args.as_annotation:
            task["annotations"] = [{"result": results}]
        else:
            task["predictions"] = [{"model_version": "ground-truth", "result": results}]
        counts.append(int(labels.max()))
    ids = client.projects.import_tasks(id=tiled.id, request=tasks, return_task_ids=True).task_ids
    result["tiled"] = {"tasks": len(tasks), "tesserae_per_task": counts,
                       "prediction_kb": [round(len(json.dumps((t.get("predictions") or t["annotations"])[0])) / 1024)
                                         for t in tasks]}
    order = sorted(range(len(ids)), key=lambda i: -counts[i])[:args.tiles]
    return [("tiled", tiled.id, ids[i], counts[i]) for i in order] + [("whole", whole.id, whole_task, len(regions))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tesserae", type=int, default=2000, help="about this many tesserae in the mosaic")
    parser.add_argument("--max-tesserae", type=int, default=300, help="tiled tasks: tesserae per crop at most")
    parser.add_argument("--tiles", type=int, default=2, help="how many tiled tasks to open")
    parser.add_argument("--clicks", type=int, default=0, help="also click this many tesserae of a crop")
    parser.add_argument("--only-clicks", action="store_true", help="skip the whole/tiled measurements")
    parser.add_argument("--iou", type=float, default=DEFAULT_IOU,
                        help="fineness of the pre-labelled polygons (MOSAIC_BACKEND_POLYGON_IOU)")
    parser.add_argument("--lean", action="store_true",
                        help="pre-labels with fewer fields and 2-decimal points (see lean())")
    parser.add_argument("--as-annotation", action="store_true",
                        help="import the pre-labels as annotations, not predictions (no submit measured)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic mosaic")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    pitch = 33
    side = int(pitch * np.sqrt(args.tesserae * 1.1))  # a 33-px pitch holds about 0.9 tesserae per pitch squared
    image, truth = synth_mosaic(np.random.default_rng(args.seed), int(side * 1.15), int(side / 1.15),
                                tessera_size=pitch)
    height, width = truth.shape
    result: dict = {"mosaic": {"width": width, "height": height, "tesserae": int(truth.max())}, "cpus": os.cpu_count(),
                    "lean": args.lean, "iou": args.iou, "as_annotation": args.as_annotation, "load_average_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="bench-browser-") as tmp, \
            LabelStudioServer(ensure_installed()) as server:
        opened = [] if args.only_clicks else prepare(server, image, truth, args, Path(tmp), result)
        with sync_playwright() as playwright:
            context = launch(playwright, Path(tmp) / "profile")
            context.add_init_script(LONGTASKS)
            page = context.new_page()
            login(page, server)
            for where, project, task, regions in opened:  # a fresh tab each
                tab = context.new_page()
                measured = measure(tab, server, project, task, regions, submit=not args.as_annotation)
                if where == "whole":
                    result["whole"]["opened"] = measured
                else:
                    result["tiled"].setdefault("opened", []).append(measured)
                tab.close()
            if args.clicks:
                tab = context.new_page()
                result["clicks"] = measure_clicks(tab, server, image, truth, args.clicks, Path(tmp))
                tab.close()
            context.close()
    result["load_average_after"] = load_average()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
