"""Fetching task images (and tasks) from Label Studio, safely and with a small cache.

Task data holds the image as a Label Studio URL, and the backend only ever talks to the one
Label Studio it is configured for (``LABEL_STUDIO_URL``, else the hostname Label Studio sent to
/setup):

* ``/data/upload/...`` (also ``upload/...``): uploaded files, fetched from Label Studio;
* ``/data/local-files/?d=<path>``: local storage. ``<path>`` is relative to Label Studio's
  document root and may not climb out of it (``..``); when the backend sees the same folder
  (``LOCAL_FILES_DOCUMENT_ROOT``) the file is read from disk, never from outside that folder
  (symbolic links included);
* ``s3://``, ``gs://``, ``azure-blob://`` URIs of cloud storage: fetched through Label Studio's
  ``/tasks/<id>/presign/?fileuri=...`` endpoint, whose redirect to the presigned URL is followed
  without sending the API key;
* absolute ``http(s)://`` URLs only when they point at the Label Studio host itself; anything
  else is refused with a 400 error (the backend is no open proxy).

Requests carry ``Authorization: Token <key>`` (a legacy token) or, for a personal access token
(a JWT), ``Bearer <access token>`` obtained from ``/api/token/refresh``. Downloads and decoded
pixels are capped (``max_image_bytes``, ``max_image_pixels``) with a 413 error. Decoded images
are kept in a byte-bounded LRU for a few minutes, so the clicks after the first one on an image
neither download nor decode it again.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import posixpath
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import numpy as np

from mosaic_toolkit import imageio
from mosaic_toolkit.errors import MosaicError

from .config import Settings
from .errors import BackendError

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
MAX_REDIRECTS = 3
IMAGE_TTL_S = 600.0  # a cached image is fetched again after this long (the file may change)
_CHUNK = 1 << 20

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """A thread-safe LRU map bounded by the bytes of its values, with an optional time to live."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int], ttl: float | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.ttl = ttl
        self._size_of = size_of
        self._items: OrderedDict[str, tuple[V, int, float]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._used = 0

    def get(self, key: str) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if self.ttl is not None and time.monotonic() - item[2] > self.ttl:
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: V) -> None:
        size = self._size_of(value)
        with self._lock:
            if key in self._items:
                self._drop(key)
            if size > self.max_bytes:
                return  # larger than the whole cache: not kept
            self._items[key] = (value, size, time.monotonic())
            self._used += size
            while self._used > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        _, size, _ = self._items.pop(key)
        self._used -= size


@dataclass
class LabelStudioLink:
    """Where Label Studio is and how to authenticate: from the settings, else from /setup."""

    url: str | None
    api_key: str | None

    def __post_init__(self) -> None:
        self.url_configured = self.url is not None  # settings win over what /setup sends
        self.key_configured = self.api_key is not None

    def update_from_setup(self, hostname: Any, token: Any) -> None:
        """Adopt the hostname and token of a /setup request where the settings gave none (the
        token only ever goes to ``url``, so a configured address keeps it there)."""
        if not self.url_configured and isinstance(hostname, str) and hostname.startswith(("http://", "https://")):
            self.url = hostname.rstrip("/")
        if not self.key_configured and isinstance(token, str) and token:
            self.api_key = token

    def require(self, what: str) -> tuple[str, str]:
        if not self.url:
            raise BackendError(f"{what}: Label Studio's address is unknown; set LABEL_STUDIO_URL "
                               "(or connect the backend from Label Studio, which sends it)", 502)
        if not self.api_key:
            raise BackendError(f"{what}: no API key for Label Studio; set LABEL_STUDIO_API_KEY", 502)
        return self.url, self.api_key


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    netloc = parts.netloc.lower()
    default = {"http": ":80", "https": ":443"}.get(parts.scheme.lower(), "")
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return parts.scheme.lower(), netloc


def local_files_path(url: str) -> str:
    """The relative path ``d`` of a ``/data/local-files/?d=...`` URL, normalised; a 400 error
    when it is empty or climbs out of the document root."""
    values = parse_qs(urlsplit(url).query, keep_blank_values=True).get("d")
    relative = values[-1] if values else ""
    if not relative:
        raise BackendError(f"{url}: local-files URL without a file path (?d=...)")
    normal = posixpath.normpath(relative.replace("\\", "/")).lstrip("/")
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise BackendError(f"{url}: local-files path {relative!r} escapes the document root")
    return normal


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """RGB uint8 pixels of an image file's bytes in the displayed frame (EXIF orientation
    applied, as Label Studio's editor shows it), read by ``mosaic_toolkit.imageio`` like every
    command reads files; 413 when it has more than ``max_pixels``."""
    try:
        info = imageio.image_info(data, name)
        if info.width * info.height > max_pixels:
            raise BackendError(
                f"{name}: image is {info.width}x{info.height} = {info.width * info.height / 1e6:.1f} MP, "
                f"more than the limit of {max_pixels / 1e6:.1f} MP (MOSAIC_BACKEND_MAX_IMAGE_PIXELS)", 413)
        return imageio.read_image(data, name)
    except BackendError:
        raise
    except MosaicError as exc:
        raise BackendError(f"{name}: not a readable image ({str(exc).removeprefix(f'{name}: ')})", 400) from exc


class ImageFetcher:
    """Downloads task images and tasks from Label Studio (see the module docstring)."""

    def __init__(self, settings: Settings, link: LabelStudioLink) -> None:
        self.settings = settings
        self.link = link
        self.cache: ByteLRU[tuple[np.ndarray, str]] = ByteLRU(settings.image_cache_mb * 2**20, lambda e: e[0].nbytes,
                                                  ttl=IMAGE_TTL_S)
        self._client = httpx.Client(timeout=settings.fetch_timeout, follow_redirects=False)
        self._access: tuple[str, str] | None = None  # (personal token, access token)
        self._access_lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------- URLs
    def resolve(self, reference: str, task_id: Any) -> str | Path:
        """The absolute Label Studio URL of an image reference, or a local file for local-files
        URLs under a shared document root."""
        if not isinstance(reference, str) or not reference.strip():
            raise BackendError(f"task {task_id}: the image reference is empty")
        ref = reference.strip()
        if ref.startswith(("upload/", "/upload/")):
            ref = "/data/" + ref.lstrip("/")
        if ref.startswith(CLOUD_SCHEMES):
            base, _ = self.link.require(f"task {task_id}")
            fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
            return f"{base}/tasks/{task_id}/presign/?fileuri={fileuri}"
        parts = urlsplit(ref)
        if parts.scheme in ("http", "https"):
            base, _ = self.link.require(f"task {task_id}")
            if _origin(ref) != _origin(base):
                raise BackendError(
                    f"task {task_id}: image {reference} is not on the Label Studio host {base}; "
                    "the backend only fetches images from Label Studio")
            url = ref
        elif parts.scheme or not ref.startswith("/"):
            raise BackendError(
                f"task {task_id}: image reference {reference[:200]!r} is not a Label Studio URL "
                "(/data/upload/..., /data/local-files/?d=..., s3://... or http(s) on its host)")
        else:
            base, _ = self.link.require(f"task {task_id}")
            url = base + ref
        if urlsplit(url).path.rstrip("/") == "/data/local-files":
            try:
                relative = local_files_path(url)
            except BackendError as exc:
                raise BackendError(f"task {task_id}: {exc}") from exc
            root = self.settings.local_files_root
            if root is not None:
                path = self._local_file(root, relative, task_id)
                if path is not None:
                    return path
        return url

    @staticmethod
    def _local_file(root: Path, relative: str, task_id: Any) -> Path | None:
        """The file under the shared document root, or None when it is not there."""
        base = root.resolve()
        path = (base / relative).resolve()
        if not path.is_relative_to(base):
            raise BackendError(f"task {task_id}: local-files path {relative!r} escapes the document root")
        return path if path.is_file() else None

    # ---------------------------------------------------------------- downloads
    def image(self, reference: str, task_id: Any) -> tuple[np.ndarray, str]:
        """The RGB pixels of a task's image (read-only, cached) and a hash of their content
        (the key of the backend's per-image caches)."""
        source = self.resolve(reference, task_id)
        cached = self.cache.get(str(source))
        if cached is not None:
            return cached
        name = f"task {task_id}: image {reference}"
        if isinstance(source, Path):
            size = source.stat().st_size
            if size > self.settings.max_image_bytes:
                raise self._too_big(name, size)
            data = source.read_bytes()
        else:
            data = self._download(source, name)
        image = decode_image(data, name, self.settings.max_image_pixels)
        image.flags.writeable = False  # shared by requests through the cache
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(repr(image.shape).encode())
        entry = (image, digest.hexdigest())
        self.cache.put(str(source), entry)
        return entry

    def task(self, task_id: int) -> dict[str, Any]:
        """A task fetched from Label Studio's API (for requests that name tasks by id)."""
        base, _ = self.link.require(f"task {task_id}")
        data = self._download(f"{base}/api/tasks/{int(task_id)}/", f"task {task_id}")
        try:
            task = json.loads(data)
        except ValueError as exc:
            raise BackendError(f"task {task_id}: Label Studio answered with invalid JSON", 502) from exc
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise BackendError(f"task {task_id}: Label Studio answered without task data", 502)
        return task

    def _too_big(self, name: str, size: int) -> BackendError:
        return BackendError(
            f"{name}: file is {size / 2**20:.1f} MiB, more than the limit of "
            f"{self.settings.max_image_bytes / 2**20:.1f} MiB (MOSAIC_BACKEND_MAX_IMAGE_BYTES)", 413)

    def _auth_header(self, refresh: bool = False) -> dict[str, str]:
        base, key = self.link.require("Label Studio")
        if key.count(".") != 2:  # a legacy token
            return {"Authorization": f"Token {key}"}
        with self._access_lock:  # a personal access token: exchange it for an access token
            if refresh or self._access is None or self._access[0] != key:
                try:
                    answer = self._client.post(f"{base}/api/token/refresh", json={"refresh": key})
                    answer.raise_for_status()
                    self._access = (key, answer.json()["access"])
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    raise BackendError(f"{base}: cannot exchange the personal access token "
                                       f"({type(exc).__name__}: {exc})", 502) from exc
            return {"Authorization": f"Bearer {self._access[1]}"}

    def _download(self, url: str, name: str) -> bytes:
        """GET ``url`` from Label Studio (following its redirects), capped in size."""
        base, _ = self.link.require(name)
        retried = False
        hops = 0
        while True:
            on_ls = _origin(url) == _origin(base)
            headers = self._auth_header() if on_ls else {}
            try:
                with self._client.stream("GET", url, headers=headers) as response:
                    if response.is_redirect and hops < MAX_REDIRECTS:
                        url = urljoin(url, response.headers.get("location", ""))
                        hops += 1
                        continue
                    if response.status_code == 401 and on_ls and not retried and headers and \
                            headers["Authorization"].startswith("Bearer"):
                        self._auth_header(refresh=True)
                        retried = True
                        continue
                    if response.status_code != 200:
                        raise self._http_error(name, url, response.status_code)
                    length = int(response.headers.get("content-length") or 0)
                    if length > self.settings.max_image_bytes:
                        raise self._too_big(name, length)
                    chunks, total = [], 0
                    for chunk in response.iter_bytes(_CHUNK):
                        total += len(chunk)
                        if total > self.settings.max_image_bytes:
                            raise self._too_big(name, total)
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.TimeoutException as exc:
                raise BackendError(f"{name}: Label Studio did not answer within "
                                   f"{self.settings.fetch_timeout:g} s ({url})", 504) from exc
            except httpx.HTTPError as exc:
                raise BackendError(f"{name}: cannot reach {url} ({type(exc).__name__}: {exc})", 502) from exc

    @staticmethod
    def _http_error(name: str, url: str, status: int) -> BackendError:
        if status in (401, 403):
            why = "refused the API key (check LABEL_STUDIO_API_KEY)"
        elif status == 404:
            return BackendError(f"{name}: not found on Label Studio (HTTP 404, {url})", 404)
        else:
            why = "failed"
        return BackendError(f"{name}: Label Studio {why} (HTTP {status}, {url})", 502)
