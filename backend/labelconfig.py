"""What the backend needs from a Label Studio labeling config.

The config is XML (see label_config.xml). The backend looks for one ``Image`` tag and the
controls pointing at it: ``BrushLabels`` and ``PolygonLabels`` (what it answers with),
``KeyPointLabels`` and ``RectangleLabels`` (the prompts). Parsed configs are cached by a hash
of their text (never the text itself), bounded by the texts' total size, since Label Studio
sends the same config with every request.
"""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .errors import BackendError
from .images import ByteLRU

OUTPUT_TAGS = ("BrushLabels", "PolygonLabels")
PROMPT_TAGS = ("KeyPointLabels", "RectangleLabels")
CACHE_BYTES = 8 * 2**20  # parsed configs kept, counted by the size of their text


@dataclass(frozen=True)
class Control:
    """One labels control: its name (a result's ``from_name``) and its label values."""

    name: str
    tag: str
    labels: tuple[str, ...]

    def label_for(self, wanted: str | None) -> str:
        """``wanted`` when this control has that label, else its first label."""
        if wanted in self.labels:
            return wanted
        if not self.labels:
            raise BackendError(f"label config: <{self.tag} name=\"{self.name}\"> has no <Label>")
        return self.labels[0]


@dataclass(frozen=True)
class LabelConfig:
    """The image tag and the controls of a config that the backend uses."""

    image_name: str  # the Image tag's name: a result's ``to_name``
    image_key: str  # the task data field holding the image URL ($image -> "image")
    brush: Control | None
    polygon: Control | None
    prompt_names: frozenset[str]  # names of the KeyPointLabels / RectangleLabels controls

    def click_control(self, choice: str = "auto") -> Control:
        """The control an interactive click answers with: ``auto`` takes PolygonLabels when
        the config has it (a polygon costs the editor far less memory than a brush mask), else
        BrushLabels; ``polygon`` or ``brush`` asks for that one (MOSAIC_BACKEND_CLICK_REGION)."""
        if choice == "brush":
            order = (self.brush,)
        elif choice == "polygon":
            order = (self.polygon,)
        else:
            order = (self.polygon, self.brush)
        for control in order:
            if control is not None:
                return control
        wanted = {"brush": "<BrushLabels>", "polygon": "<PolygonLabels>"}.get(
            choice, "<PolygonLabels> or <BrushLabels>")
        raise BackendError(f"label config: no {wanted} for image {self.image_name!r}"
                           + (f" (MOSAIC_BACKEND_CLICK_REGION={choice})" if choice != "auto" else ""))

    @property
    def region_control(self) -> Control:
        """The control a click answers with by default (``click_control("auto")``)."""
        return self.click_control("auto")

    @property
    def prelabel_control(self) -> Control:
        """The control pre-labels use: PolygonLabels (light, editable), else BrushLabels."""
        control = self.polygon or self.brush
        if control is None:
            raise BackendError(
                f"label config: no <PolygonLabels> or <BrushLabels> for image {self.image_name!r}"
            )
        return control


_parsed: ByteLRU[tuple["LabelConfig", int]] = ByteLRU(CACHE_BYTES, lambda entry: entry[1])


def parse_label_config(text: str) -> LabelConfig:
    """The backend's view of a labeling config; a BackendError (400) says what is missing."""
    if not isinstance(text, str) or not text.strip():
        raise BackendError("label config: missing (the request has no label_config)")
    key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    cached = _parsed.get(key)
    if cached is not None:
        return cached[0]
    config = _parse(text)
    _parsed.put(key, (config, len(text) + 512))
    return config


def _parse(text: str) -> LabelConfig:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise BackendError(f"label config: not valid XML ({exc})") from exc
    images = [el for el in root.iter() if el.tag == "Image"]
    if not images:
        raise BackendError("label config: no <Image> tag")
    controls: dict[str, list[Control]] = {tag: [] for tag in OUTPUT_TAGS + PROMPT_TAGS}
    image = None
    for candidate in images:
        name = candidate.get("name")
        matched = False
        for el in root.iter():
            if el.tag in controls and el.get("toName") == name:
                labels = tuple(lab.get("value", "") for lab in el.iter("Label"))
                controls[el.tag].append(Control(el.get("name", ""), el.tag, labels))
                matched = True
        if matched:
            image = candidate
            break
    if image is None:
        raise BackendError("label config: no BrushLabels, PolygonLabels, KeyPointLabels or "
                           "RectangleLabels control points at an <Image>")
    value = image.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise BackendError(f"label config: <Image name=\"{image.get('name')}\"> value must be "
                           f"$<field>, got {value!r}")
    return LabelConfig(
        image_name=image.get("name", ""),
        image_key=value[1:],
        brush=(controls["BrushLabels"] or [None])[0],
        polygon=(controls["PolygonLabels"] or [None])[0],
        prompt_names=frozenset(c.name for tag in PROMPT_TAGS for c in controls[tag]),
    )
