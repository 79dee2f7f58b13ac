"""`mosaic-toolkit stats`: tessera statistics reports (CSV, JSON, plots, self-contained HTML).

```
INPUT      a dataset folder (images/, masks/ or instances/, manifest.json), or a `segment`
           output folder (instances/<stem>.png; images found by stem in --images)
REPORT/<stem>/tesserae.csv       one row per tessera, ``id`` as in the instance map
REPORT/<stem>/summary.json       counts, density, distributions, grout, orientation, palette
REPORT/<stem>/*.png              area and orientation histograms, measures, orientation map,
                                 orientation field, colour palette
REPORT/<stem>/report.html        all of it in one file: plots embedded, no script, no URL
REPORT/index.html                links to every mosaic's report
REPORT/compare.html, compare.json  with --compare: groups side by side, overlaid histograms
```

With several inputs, each gets its own folder: ``REPORT/<input name>/<stem>/``.
Measures and their definitions are in :mod:`mosaic_toolkit.stats.measures`.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import os
from urllib.parse import quote
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from skimage.color import lab2rgb
from tqdm import tqdm

from ..core.dataset import IMAGE_EXTENSIONS, MANIFEST, Dataset, mask_to_instances
from ..core.io import atomic_output_dir, read_image, read_instances, read_mask, write_json
from ..core.errors import MosaicError
from ..core.predictions import INSTANCES_DIR, check_out_is_separate
from .measures import MosaicStats, Units, group_summary, measure_mosaic, summarise, tessera_table

log = logging.getLogger(__name__)

# Longest side of the image drawn under the orientation plots (drawing is slow on large images).
_BACKGROUND_SIDE = 1000
_DPI = 100
_MEASURE_LABELS = {
    "area": "Area",
    "perimeter": "Perimeter",
    "equivalent_diameter": "Equivalent diameter",
    "orientation": "Orientation",
    "elongation": "Elongation",
    "solidity": "Solidity",
    "neighbours": "Neighbours",
    "L": "Lightness L*",
    "a": "Colour a* (green-red)",
    "b": "Colour b* (blue-yellow)",
}
_UNIT_TEXT = {"mm": "mm", "mm2": "mm²", "px": "px", "deg": "degrees", "ratio": "ratio",
              "count": "count", "cielab": "CIELAB"}
DEFINITIONS = (
    ("Image axes", "x to the right, y down; angles in degrees in [0, 180), counter-clockwise "
     "from the x axis as seen on screen."),
    ("Area", "number of pixels of the tessera (× pixel size² with a pixel size)."),
    ("Perimeter", "length of the outer boundary traced through the centres of the boundary "
     "pixels (OpenCV contour; a k × k pixel square measures 4(k − 1))."),
    ("Equivalent diameter", "diameter of the disc of the same area, √(4A/π)."),
    ("Orientation", "direction of the long side of the minimum-area rectangle around the "
     "tessera's pixel centres."),
    ("Elongation", "long side / short side of that rectangle, each side lengthened by one pixel "
     "(the pixels' own extent): 1 for a square."),
    ("Solidity", "area / pixels of the convex hull (1 for convex tesserae, lower when chipped "
     "or concave)."),
    ("Joints and grout width", "each grout pixel belongs to its nearest tessera; two tesserae "
     "whose parts touch meet at a joint, whose width is the median gap across it. The grout "
     "width is the mean joint width; joints over 3 × the median width are holes, not grout."),
    ("Neighbours", "tesserae met at a grout joint (on a square grid: the 4 edge neighbours, "
     "not the diagonal ones)."),
    ("Border tesserae", "tesserae touching the image border are cut by the frame: they are "
     "counted (count, density, palette) but left out of the distributions, histograms and "
     "orientation field, which describe complete tesserae."),
    ("Mean colour", "mean of the tessera's pixels in CIE L*a*b* (D65)."),
    ("Grout fraction", "background pixels / image pixels."),
    ("Orientation field and coherence", "each tessera votes with its doubled-angle vector "
     "(cos 2θ, sin 2θ), weighted by area × (1 − 1/elongation) so that squares do not vote; "
     "votes are smoothed with a Gaussian of 2 median equivalent diameters. Coherence is the "
     "mean resultant length: 1 when all tesserae are parallel, near 0 when random; global over "
     "the whole mosaic, local as the mean of the smoothed field's coherence at the tesserae."),
    ("Palette", "k-means (k ≤ 8) of the tesserae's mean Lab colours; share of tessera area."),
)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MosaicInput:
    """Where one mosaic's instance map (or mask) and, if known, its image are."""

    name: str
    instances: Path | None  # 16-bit instance map; None: 4-connected parts of ``mask``
    mask: Path | None
    image: Path | None

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(instance map, RGB image or None); a MosaicError if their sizes differ."""
        if self.instances is not None:
            instances = read_instances(self.instances)
        else:
            instances = mask_to_instances(read_mask(self.mask))
        image = read_image(self.image) if self.image is not None else None
        if image is not None and image.shape[:2] != instances.shape:
            source = self.instances or self.mask
            raise MosaicError(
                f"{self.image}: image is {image.shape[1]}x{image.shape[0]}, instance map "
                f"{source} is {instances.shape[1]}x{instances.shape[0]}"
            )
        return instances, image


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.<ext>`` (or ``folder/images/<stem>.<ext>`` for a dataset), if any."""
    for base in (folder / "images", folder):
        if base.is_dir():
            for ext in IMAGE_EXTENSIONS:
                for candidate in (base / f"{stem}{ext}", base / f"{stem}{ext.upper()}"):
                    if candidate.is_file():
                        return candidate
    return None


def find_mosaics(folder: str | os.PathLike, images: str | os.PathLike | None = None
                 ) -> list[MosaicInput]:
    """The mosaics of a dataset folder or of a `segment` output folder, in stem order.

    A dataset's own images are used; a `segment` output has none, so they are looked up by stem
    in ``images`` (a folder of images, or a dataset). With ``images`` given, a mosaic whose
    image cannot be found is an error; without, colour measures are left empty.
    """
    folder = Path(folder)
    images = Path(images) if images is not None else None
    if images is not None and not images.is_dir():
        raise MosaicError(f"{images}: images folder not found")
    if not folder.is_dir():
        raise MosaicError(f"{folder}: folder not found")

    def image_for(stem: str) -> Path | None:
        if images is None:
            return None
        path = find_image(images, stem)
        if path is None:
            raise MosaicError(f"{images}: no image named {stem}.<png|jpg|...> for {folder}")
        return path

    if (folder / "images").is_dir() or (folder / MANIFEST).is_file():
        dataset = Dataset.open(folder)
        found = []
        for sample in dataset.samples:
            inst = folder / INSTANCES_DIR / f"{sample.stem}.png"
            mask = folder / "masks" / f"{sample.stem}.png"
            if not inst.is_file() and not mask.is_file():
                raise MosaicError(f"{folder}: sample {sample.stem} has neither {inst} nor {mask}")
            image = dataset.image_path(sample)
            if not image.is_file():
                log.warning("%s: image not found, looking in --images", image)
                image = image_for(sample.stem)
            found.append(MosaicInput(sample.stem, inst if inst.is_file() else None, mask, image))
        return sorted(found, key=lambda m: m.name)
    inst_dir = folder / INSTANCES_DIR
    stems = sorted(p.stem for p in inst_dir.glob("*.png")) if inst_dir.is_dir() else []
    if not stems:
        raise MosaicError(
            f"{folder}: no instance maps found (expected a dataset folder with images/ and "
            "masks/ or instances/, or a `segment` output folder with instances/<stem>.png)"
        )
    return [MosaicInput(s, inst_dir / f"{s}.png", None, image_for(s)) for s in stems]


# --------------------------------------------------------------------------------------------
# The whole report
# --------------------------------------------------------------------------------------------
def stats_report(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    pixel_size: float | None = None,
    images: str | os.PathLike | None = None,
    compare: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Measure every mosaic of ``inputs`` and write the report folder ``out`` (atomically).

    Every input is checked before anything is measured; on any error nothing is written.
    With ``compare``, several inputs are compared as groups (their mosaics pooled), and a single
    input's mosaics are compared with each other. Returns ``{"mosaics": {path: summary},
    "groups": [group summaries] (with compare)}``, paths relative to ``out``.
    """
    if not inputs:
        raise MosaicError("stats: give at least one dataset or `segment` output folder")
    units = Units(pixel_size)
    out = Path(out)
    folders = [Path(p) for p in inputs]
    check_out_is_separate(out, folders + ([Path(images)] if images is not None else []))
    sources = {name: find_mosaics(folder, images)
               for name, folder in zip(_unique_names(folders), folders)}
    nested = len(sources) > 1
    jobs = [(f"{group}/{m.name}" if nested else m.name, group, m)
            for group, mosaics in sources.items() for m in mosaics]

    result: dict[str, Any] = {"mosaics": {}}
    measured: dict[str, list[MosaicStats]] = {}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for rel, group, mosaic in tqdm(jobs, desc="stats", unit="mosaic", disable=None):
            instances, image = mosaic.load()
            stats = measure_mosaic(instances, image, name=mosaic.name, units=units)
            summary = summarise(stats)
            summary["instances"] = str(mosaic.instances or mosaic.mask)
            summary["image"] = str(mosaic.image) if mosaic.image else None
            write_mosaic_report(tmp / rel, stats, summary, image, instances)
            result["mosaics"][rel] = summary
            measured.setdefault(group if nested else mosaic.name, []).append(stats)
        if compare:
            groups = [group_summary(name, members) for name, members in measured.items()]
            result["groups"] = groups
            write_json(tmp / "compare.json", {"units": units.describe(), "groups": groups})
            (tmp / "compare.html").write_text(compare_html(groups, measured, units),
                                              encoding="utf-8")
        (tmp / "index.html").write_text(index_html(result["mosaics"], units, compare),
                                        encoding="utf-8")
    return result


def write_mosaic_report(folder: Path, stats: MosaicStats, summary: dict[str, Any],
                        image: np.ndarray | None, instances: np.ndarray) -> None:
    """tesserae.csv, summary.json, the plots and report.html of one mosaic into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "tesserae.csv", tessera_table(stats))
    write_json(folder / "summary.json", summary)
    plots = mosaic_plots(stats, image, instances)
    for filename, png in plots.items():
        (folder / filename).write_bytes(png)
    (folder / "report.html").write_text(mosaic_html(stats, summary, plots), encoding="utf-8")


def write_csv(path: Path, table: dict[str, list[Any]]) -> None:
    """Columns to CSV; None becomes an empty cell."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(table))
        for row in zip(*table.values()):
            writer.writerow(["" if v is None else v for v in row])


def _unique_names(folders: Sequence[Path]) -> list[str]:
    """Folder names, made unique with -2, -3... (two inputs can both be called ``pred``)."""
    names: list[str] = []
    for folder in folders:
        base = folder.resolve().name or "input"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's Figure directly: no pyplot state, Agg rendering)
# --------------------------------------------------------------------------------------------
def measure_label(measure: str, units: Units) -> str:
    """Human-readable name with unit, e.g. ``Area (mm²)``."""
    unit = units.column(measure).rsplit("_", 1)[1]
    return f"{_MEASURE_LABELS[measure]} ({_UNIT_TEXT[unit]})"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def mosaic_plots(stats: MosaicStats, image: np.ndarray | None, instances: np.ndarray
                 ) -> dict[str, bytes]:
    """PNG files of one mosaic's plots, by file name (palette only with an image)."""
    background = _background(image, instances)
    plots = {
        "area_histogram.png": plot_area_histogram(stats),
        "orientation_histogram.png": plot_orientation_rose(stats),
        "measures.png": plot_measures(stats),
        "orientation_map.png": plot_orientation_map(stats, background),
        "orientation_field.png": plot_orientation_field(stats, background),
    }
    if stats.palette:
        plots["palette.png"] = plot_palette(stats)
    return plots


def _background(image: np.ndarray | None, instances: np.ndarray) -> np.ndarray:
    """A pale greyscale of the image (or light-grey tesserae on white), at most 1000 px."""
    step = max(1, math.ceil(max(instances.shape) / _BACKGROUND_SIDE))
    if image is None:
        return np.where(instances[::step, ::step] > 0, 0.85, 1.0)
    grey = image[::step, ::step, :3].astype(np.float64).mean(axis=2) / 255.0
    return 0.45 + 0.55 * grey  # pale, so that coloured lines stand out


def plot_area_histogram(stats: MosaicStats) -> bytes:
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    area = stats.complete("area")
    if len(area):
        ax.hist(area, bins=min(40, max(5, len(area) // 5)), color="#4c72b0", edgecolor="white")
        ax.axvline(float(np.median(area)), color="#c44e52", lw=1.5, label="median")
        ax.legend(frameon=False)
    ax.set_xlabel(measure_label("area", stats.units))
    ax.set_ylabel("tesserae")
    ax.set_title(f"Tessera area, {stats.name}")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.16, top=0.9)
    return _png(fig)


def plot_orientation_rose(stats: MosaicStats) -> bytes:
    """A half rose diagram (0-180 degrees, counter-clockwise from the x axis on screen)."""
    fig = Figure(figsize=(6, 3.8))
    ax = fig.add_subplot(projection="polar")
    ax.set_thetamin(0)
    ax.set_thetamax(180)
    counts, edges = np.histogram(stats.complete("orientation"), bins=36, range=(0, 180))
    width = np.radians(edges[1] - edges[0])
    ax.bar(np.radians(edges[:-1]), counts, width=width, align="edge", color="#55a868",
           edgecolor="white")
    if math.isfinite(stats.dominant_orientation):
        top = max(int(counts.max()), 1)
        ax.plot([np.radians(stats.dominant_orientation)] * 2, [0, top], color="#c44e52",
                lw=2, label=f"dominant {stats.dominant_orientation:.0f}°")
        ax.legend(loc="lower left", bbox_to_anchor=(-0.1, -0.15), frameon=False)
    ax.yaxis.set_major_locator(MaxNLocator(3, integer=True))
    ax.set_title(f"Orientation (degrees), coherence {_fmt(stats.coherence_global)}")
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.02, top=0.88)
    return _png(fig)


def plot_measures(stats: MosaicStats) -> bytes:
    fig = Figure(figsize=(10, 5.6))
    measures = ("perimeter", "equivalent_diameter", "elongation", "solidity", "neighbours")
    for k, measure in enumerate(measures):
        ax = fig.add_subplot(2, 3, k + 1)
        values = stats.complete(measure)
        if measure == "neighbours":
            counts = np.bincount(values.astype(np.int64)) if len(values) else np.zeros(1)
            ax.bar(np.arange(len(counts)), counts, color="#8172b2")
        elif len(values):
            # A few extreme tiles (slivers) would squash the plot: the last bar holds them.
            ax.hist(np.minimum(values, np.percentile(values, 99)), bins=30, color="#8172b2",
                    edgecolor="white")
        ax.set_xlabel(measure_label(measure, stats.units))
        ax.set_ylabel("tesserae")
    ax = fig.add_subplot(2, 3, 6)
    lab = stats.tesserae.lab
    if lab is not None and len(lab):  # every tessera: colour does not suffer from the frame
        ax.scatter(lab[:, 1], lab[:, 2], s=6, c=np.clip(lab2rgb(lab[None])[0], 0, 1))
        ax.set_xlabel("a* (CIELAB)")
        ax.set_ylabel("b* (CIELAB)")
    else:
        ax.text(0.5, 0.5, "no image: no colour", ha="center", va="center")
        ax.set_axis_off()
    fig.suptitle(f"Tessera measures, {stats.name}")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.92, wspace=0.3, hspace=0.38)
    return _png(fig)


def _figure_over(background: np.ndarray, shape: tuple[int, int]) -> tuple[Figure, Any]:
    """A figure with the background drawn in image coordinates (x right, y down).

    The axes keep the image's aspect; margins are fixed in inches (labels, colour bar).
    """
    h, w = shape
    left, right, bottom, top = 0.8, 1.3, 0.6, 0.4  # inches
    ax_w = 6.0
    ax_h = min(max(ax_w * h / w, 1.5), 12.0)
    fig_w, fig_h = left + ax_w + right, bottom + ax_h + top
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((left / fig_w, bottom / fig_h, ax_w / fig_w, ax_h / fig_h))
    ax.imshow(background, cmap="gray", vmin=0, vmax=1, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
              interpolation="antialiased")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    fig.add_axes(((left + ax_w + 0.25) / fig_w, bottom / fig_h, 0.18 / fig_w, ax_h / fig_h),
                 label="colorbar")
    return fig, ax


def _segments(centres: np.ndarray, angles_deg: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Line segments (N, 2, 2) centred on image points, at screen angles (y down)."""
    t = np.radians(angles_deg)
    half = np.stack([np.cos(t), -np.sin(t)], axis=1) * (lengths / 2)[:, None]
    return np.stack([centres - half, centres + half], axis=1)


def plot_orientation_map(stats: MosaicStats, background: np.ndarray) -> bytes:
    """Every tessera's long axis, coloured by orientation, over the image."""
    fig, ax = _figure_over(background, stats.shape)
    t = stats.tesserae
    segments = _segments(t.centroid, t.orientation, 0.8 * t.equivalent_diameter)
    # Border tesserae (partial, left out of the statistics) in thin black.
    ax.add_collection(LineCollection(segments[t.border], colors="black", linewidths=0.7))
    lines = LineCollection(segments[~t.border], cmap="hsv", linewidths=1.6)
    lines.set_array(t.orientation[~t.border])
    lines.set_clim(0, 180)
    ax.add_collection(lines)
    bar = fig.colorbar(lines, cax=fig.axes[1])
    bar.set_label("orientation (degrees)")
    ax.set_title(f"Tessera orientation, {stats.name}")
    return _png(fig)


def plot_orientation_field(stats: MosaicStats, background: np.ndarray) -> bytes:
    """The smoothed orientation field as a line field, coloured by local coherence."""
    fig, ax = _figure_over(background, stats.shape)
    field = stats.field
    stride = max(1, int(round(field.sigma / field.step)))  # one line per sigma
    rows = np.arange(stride // 2, field.weight.shape[0], stride)
    cols = np.arange(stride // 2, field.weight.shape[1], stride)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    keep = field.weight[rr, cc] > 0.05 * max(float(field.weight.max()), 1e-300)
    rr, cc = rr[keep], cc[keep]
    if len(rr):
        centres = np.stack([(cc + 0.5) * field.step, (rr + 0.5) * field.step], axis=1)
        coh = field.coherence[rr, cc]
        spacing = stride * field.step
        lines = LineCollection(
            _segments(centres, field.angle_deg[rr, cc], 0.9 * spacing * np.maximum(coh, 0.15)),
            cmap="viridis", linewidths=2.5,
        )
        lines.set_array(coh)
        lines.set_clim(0, 1)
        ax.add_collection(lines)
        bar = fig.colorbar(lines, cax=fig.axes[1])
        bar.set_label("local coherence (0 random, 1 aligned)")
    else:
        fig.axes[1].set_axis_off()
    ax.set_title(f"Orientation field, {stats.name}: coherence global "
                 f"{_fmt(stats.coherence_global)}, local {_fmt(stats.coherence_local)}")
    return _png(fig)


def plot_palette(stats: MosaicStats) -> bytes:
    """The dominant colours as a strip, widths proportional to their share of tessera area."""
    fig = Figure(figsize=(8, 1.9))
    ax = fig.add_subplot()
    left = 0.0
    for entry in stats.palette or []:
        share = entry["area_share"]
        ax.barh(0, share, left=left, color=entry["hex"], edgecolor="white")
        if share > 0.06:
            lightness = entry["lab"][0]
            ax.text(left + share / 2, 0, f"{entry['hex']}\n{share:.0%}", ha="center",
                    va="center", fontsize=8, color="black" if lightness > 55 else "white")
        left += share
    ax.set_xlim(0, max(left, 1e-9))
    ax.set_yticks([])
    ax.set_xlabel("share of tessera area")
    ax.set_title(f"Colour palette, {stats.name}")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.3, top=0.82)
    return _png(fig)


def compare_plot(measured: dict[str, list[MosaicStats]]) -> bytes:
    """Overlaid area, orientation and elongation histograms of the groups (densities)."""
    fig = Figure(figsize=(12, 3.8))
    units = next(iter(measured.values()))[0].units
    pooled = {name: {m: np.concatenate([s.complete(m) for s in members])
                     for m in ("area", "orientation", "elongation")}
              for name, members in measured.items()}
    for k, measure in enumerate(("area", "orientation", "elongation")):
        ax = fig.add_subplot(1, 3, k + 1)
        values = [p[measure] for p in pooled.values()]
        everything = np.concatenate(values)
        if measure == "orientation":
            bins = np.linspace(0, 180, 37)
        elif len(everything):
            bins = np.linspace(*np.percentile(everything, [0, 99]), 31) \
                if np.ptp(everything) > 0 else 10
        else:
            bins = 10
        for name, v in zip(pooled, values):
            if len(v):
                ax.hist(v, bins=bins, density=True, histtype="step", lw=1.8, label=name)
        ax.set_xlabel(measure_label(measure, units))
        ax.set_ylabel("density")
    if fig.axes[0].get_legend_handles_labels()[0]:
        fig.axes[0].legend(frameon=False, fontsize=8)
    fig.suptitle("Groups compared (each histogram normalised to unit area)")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.16, top=0.86, wspace=0.3)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# HTML (self-contained: inline CSS, PNGs as data URIs, no script, no external URL)
# --------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; background: #fff; }
h1 { font-size: 1.7em; border-bottom: 3px solid #8a5a2b; padding-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; color: #5a3a1b; }
.units { background: #fff6e0; border-left: 5px solid #d4ac58; padding: 0.6em 1em; }
.meta { color: #666; font-size: 0.9em; word-break: break-all; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th { background: #f1ebe2; } td:first-child, th:first-child { text-align: left; }
code { font-size: 0.9em; color: #555; }
figure { margin: 1em 0; flex: 1 1 420px; } figure img { max-width: 100%; border: 1px solid #ddd; }
.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figcaption { color: #555; font-size: 0.9em; }
.swatch { display: inline-block; width: 2.2em; height: 1.1em; border: 1px solid #999;
          vertical-align: middle; }
dt { font-weight: bold; margin-top: 0.4em; } dd { margin-left: 1.5em; }
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"{body}\n</body>\n</html>\n")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):.{digits}g}" if abs(float(value)) < 1e4 else f"{float(value):,.0f}"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def _mosaic_rows(summary: dict[str, Any], units: Units) -> list[list[str]]:
    """Rows of per-mosaic numbers, shared by the mosaic and compare pages."""
    density = "tesserae per cm²" if units.physical else "tesserae per megapixel"
    orient = summary["orientation"]
    return [
        ["Tesserae", _fmt(summary["tesserae"])],
        ["Complete tesserae (not cut by the image border)", _fmt(summary["tesserae_complete"])],
        [f"Density ({density})", _fmt(summary[units.density_key])],
        ["Grout fraction (background / image pixels)", _fmt(summary["grout_fraction"])],
        [f"Mean grout width ({_UNIT_TEXT[units.length]})",
         _fmt(summary[f"grout_width_{units.length}"])],
        ["Dominant orientation (degrees)", _fmt(orient["dominant_deg"])],
        ["Orientation coherence, global (0–1)", _fmt(orient["coherence_global"])],
        ["Orientation coherence, local (0–1)", _fmt(orient["coherence_local"])],
    ]


def mosaic_html(stats: MosaicStats, summary: dict[str, Any], plots: dict[str, bytes]) -> str:
    """One mosaic's self-contained report."""
    units = stats.units
    name = html.escape(stats.name)
    h, w = stats.shape
    dist_rows = []
    for measure in ("area", "perimeter", "equivalent_diameter", "elongation", "solidity",
                    "neighbours", "L", "a", "b"):
        d = summary["distributions"].get(units.column(measure))
        if d is None:
            continue
        dist_rows.append([measure_label(measure, units), f"<code>{units.column(measure)}</code>",
                          _fmt(d["median"]), _fmt(d["iqr"]),
                          f"{_fmt(d['q25'])} – {_fmt(d['q75'])}", _fmt(d["mean"])])
    captions = {
        "area_histogram.png": "Distribution of tessera areas (red: median).",
        "orientation_histogram.png": "Rose diagram of tessera orientations, 0–180° "
                                     "counter-clockwise from the x axis on screen.",
        "measures.png": "Distributions of the other measures (values above the 99th "
                        "percentile are counted in the last bar); colours in the a*/b* plane.",
        "orientation_map.png": "Long axis of every tessera, coloured by orientation (thin "
                               "black: border tesserae, left out of the statistics).",
        "orientation_field.png": "Smoothed orientation field (line direction) and its local "
                                 "coherence (colour and length): how tesserae follow guidelines.",
    }
    def figure(filename: str) -> str:
        caption = html.escape(captions[filename])
        return (f'<figure><a href="{filename}">{_img(plots[filename], captions[filename])}</a>'
                f"<figcaption>{caption}</figcaption></figure>")

    figures = "\n".join(
        f'<div class="row">{"".join(figure(f) for f in row)}</div>'
        for row in (("area_histogram.png", "orientation_histogram.png"), ("measures.png",),
                    ("orientation_map.png", "orientation_field.png"))
    )
    if stats.palette:
        swatches = _table(
            ["Colour", "sRGB", "L*, a*, b*", "Tesserae", "Share of area"],
            [[f'<span class="swatch" style="background:{p["hex"]}"></span>', p["hex"],
              ", ".join(f"{x:.1f}" for x in p["lab"]), _fmt(p["tesserae"]),
              f"{p['area_share']:.1%}"] for p in stats.palette],
        )
        palette = (f"<figure>{_img(plots['palette.png'], 'colour palette')}</figure>\n"
                   f"{swatches}")
    else:
        palette = ("<p>No colour: no image was given (or no tessera was found), so colour "
                   "measures and palette are empty.</p>")
    definitions = "\n".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                            for k, v in DEFINITIONS)
    body = f"""<h1>Tessera statistics: {name}</h1>
<p class="units"><strong>Units.</strong> {html.escape(units.describe())}</p>
<p class="meta">Image {w} × {h} px. Instance map: {html.escape(str(summary.get("instances")))}.
Image: {html.escape(str(summary.get("image") or "none"))}.
Data: <a href="tesserae.csv">tesserae.csv</a> (one row per tessera),
<a href="summary.json">summary.json</a>.</p>
<h2>Mosaic</h2>
{_table(["Measure", "Value"], _mosaic_rows(summary, units))}
<h2>Tesserae</h2>
<p>Complete tesserae only (not touching the image border).</p>
{_table(["Measure", "CSV column", "Median", "IQR", "Q25 – Q75", "Mean"], dist_rows)}
<h2>Plots</h2>
{figures}
<h2>Colour palette</h2>
{palette}
<h2>Definitions</h2>
<dl>
{definitions}
</dl>"""
    return _page(f"Tessera statistics: {stats.name}", body)


def index_html(summaries: dict[str, dict[str, Any]], units: Units, compare: bool) -> str:
    """The list of mosaic reports, with their headline numbers."""
    density = "per cm²" if units.physical else "per megapixel"
    rows = []
    for rel, s in summaries.items():
        area = s["distributions"].get(units.column("area"), {}).get("median")
        rows.append([
            f'<a href="{html.escape(quote(rel))}/report.html">{html.escape(rel)}</a>',
            _fmt(s["tesserae"]), _fmt(s[units.density_key]), _fmt(area),
            _fmt(s["grout_fraction"]), _fmt(s["orientation"]["coherence_local"]),
        ])
    table = _table(["Mosaic", "Tesserae", f"Density ({density})",
                    f"Median area ({_UNIT_TEXT[units.area]})", "Grout fraction",
                    "Local coherence"], rows)
    link = '<p><a href="compare.html">Groups compared side by side</a></p>' if compare else ""
    body = f"""<h1>Tessera statistics</h1>
<p class="units"><strong>Units.</strong> {html.escape(units.describe())}</p>
{link}
{table}"""
    return _page("Tessera statistics", body)


def compare_html(groups: list[dict[str, Any]], measured: dict[str, list[MosaicStats]],
                 units: Units) -> str:
    """Group summaries side by side and overlaid histograms."""
    names = [g["group"] for g in groups]
    columns = [[row[1] for row in _mosaic_rows(g, units)] for g in groups]
    labels = [row[0] for row in _mosaic_rows(groups[0], units)]
    rows = [["Mosaics"] + [_fmt(len(g["mosaics"])) for g in groups]]
    rows += [[label] + [c[i] for c in columns] for i, label in enumerate(labels)]
    for measure in ("area", "perimeter", "equivalent_diameter", "elongation", "solidity",
                    "neighbours", "L", "a", "b"):
        key = units.column(measure)
        if all(key in g["distributions"] for g in groups):
            rows.append([f"{measure_label(measure, units)}: median (IQR)"] + [
                f"{_fmt(g['distributions'][key]['median'])} "
                f"({_fmt(g['distributions'][key]['iqr'])})" for g in groups])
    body = f"""<h1>Tessera statistics: {len(groups)} groups compared</h1>
<p class="units"><strong>Units.</strong> {html.escape(units.describe())}
Distributions pool the complete tesserae of each group; grout width and coherences are means
over its mosaics.</p>
{_table(["Measure"] + [html.escape(n) for n in names], rows)}
<figure>{_img(compare_plot(measured), "overlaid histograms")}
<figcaption>Area, orientation and elongation of the groups, overlaid.</figcaption></figure>"""
    return _page("Tessera statistics: comparison", body)
