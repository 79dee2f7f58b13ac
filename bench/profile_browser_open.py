# CPU profile of opening the 2,000-region whole-mosaic task of bench/bench_browser.py (CDP Profiler,
# self and inclusive time per function). Run from the repository root:
#   .venv/bin/python bench/profile_browser_open.py   (about 2 minutes; output: profile_whole_open.txt)
import sys, json, tempfile, collections
from pathlib import Path
sys.argv = ["x", "--tiles", "0"]
sys.path.insert(0, "bench"); sys.path.insert(0, "tests")
import numpy as np
import bench_browser as bb
from browser_helpers import launch, login
from labelstudio_server import LabelStudioServer, ensure_installed
from mosaic_toolkit.data.synth import synth_mosaic
import argparse
args = argparse.Namespace(tesserae=2000, max_tesserae=300, tiles=0, iou=0.97, lean=False, as_annotation=False)
side = int(33 * np.sqrt(2000 * 1.1))
image, truth = synth_mosaic(np.random.default_rng(0), int(side * 1.15), int(side / 1.15), tessera_size=33)
from playwright.sync_api import sync_playwright
with tempfile.TemporaryDirectory() as tmp, LabelStudioServer(ensure_installed()) as server:
    result = {}
    opened = bb.prepare(server, image, truth, args, Path(tmp), result)
    [(where, project, task, regions)] = [o for o in opened if o[0] == "whole"]
    with sync_playwright() as pw:
        ctx = launch(pw, Path(tmp) / "profile"); ctx.add_init_script(bb.LONGTASKS)
        page = ctx.new_page(); login(page, server)
        tab = ctx.new_page()
        cdp = ctx.new_cdp_session(tab)
        cdp.send("Profiler.enable"); cdp.send("Profiler.setSamplingInterval", {"interval": 2000})
        orig_click = None
        tab.goto(f"{server.url}/projects/{project}/data")
        rows = tab.locator("[data-testid=table-row]"); rows.first.wait_for()
        cdp.send("Profiler.start")
        rows.first.get_by_text(str(task), exact=True).first.click()
        tab.wait_for_function(f"n => {bb.SELECTED}?.regions?.length === n", arg=regions, timeout=300000)
        tab.evaluate("""(quiet) => new Promise(resolve => { const last = () => Math.max(0, ...window.__longtasks.map(([s, d]) => s + d));
            const poll = () => performance.now() - last() >= quiet ? resolve(1) : setTimeout(poll, 100); poll(); })""", 1000)
        prof = cdp.send("Profiler.stop")["profile"]
        ctx.close()
nodes = {n["id"]: n for n in prof["nodes"]}
dt = collections.Counter()
for sid, d in zip(prof["samples"], prof["timeDeltas"]):
    dt[sid] += d
self_t = collections.Counter(); parent = {}
for n in prof["nodes"]:
    for c in n.get("children", []): parent[c] = n["id"]
def key(n):
    cf = n["callFrame"]; return f'{cf["functionName"] or "(anon)"} {cf["url"].rsplit("/",1)[-1]}:{cf["lineNumber"]}:{cf["columnNumber"]}'
total = collections.Counter()
for sid, d in dt.items():
    self_t[key(nodes[sid])] += d
    seen = set(); i = sid
    while i in nodes:
        k = key(nodes[i])
        if k not in seen: total[k] += d; seen.add(k)
        i = parent.get(i, None)
        if i is None: break
print("TOTAL s", sum(dt.values())/1e6)
print("SELF"); [print(round(v/1e6,2), k) for k, v in self_t.most_common(25)]
print("INCLUSIVE"); [print(round(v/1e6,2), k) for k, v in total.most_common(40)]
