"""Fetching task images (and tasks) from Label Studio, safely and with a small cache.

Task data holds the image as a Label Studio URL, and the backend only ever talks to the one
Label Studio it is configured for (``LABEL_STUDIO_URL``, else the hostname Label Studio sent to
/setup).

Which host gets which key (``LabelStudioLink``):

* ``LABEL_STUDIO_API_KEY`` goes only to ``LABEL_STUDIO_URL``; without a configured URL it is
  never sent anywhere (a warning at start says so);
* a hostname learnt from /setup is used only with the ``access_token`` of that same request;
  a later /setup replaces both together, and never what the operator configured;
* with ``LABEL_STUDIO_URL`` configured and no key, the token /setup sends goes to that URL.

Only these paths are fetched (anything else, including dot segments, encoded or not,
backslashes and control characters, is a 400 error before any request is made):

* ``/data/upload/...`` (also ``upload/...``): uploaded files, fetched from Label Studio;
* ``/data/local-files/?d=<path>``: local storage. ``<path>`` is relative to Label Studio's
  document root and may not climb out of it (``..``); when the backend sees the same folder
  (``LOCAL_FILES_DOCUMENT_ROOT``) the file is read from disk, never from outside that folder
  (symbolic links included);
* ``s3://``, ``gs://``, ``azure-blob://`` URIs of cloud storage: fetched through Label Studio's
  ``/tasks/<id>/presign/?fileuri=...`` endpoint (``<id>``: the task's integer id), whose
  redirect to the presigned URL is followed without sending the API key;
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
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpx
import numpy as np

from mosaic_toolkit.core import imageio
from mosaic_toolkit.core.cache import ByteLRU
from mosaic_toolkit.core.errors import MosaicError

from .config import Settings
from .errors import BackendError

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
MAX_REDIRECTS = 3
MAX_REFERENCE = 8192  # characters of an image reference
DATA_PREFIX = "/data/"  # the only Label Studio paths an image reference may name
IMAGE_TTL_S = 600.0  # a cached image is fetched again after this long (the file may change)
_CHUNK = 1 << 20

V = TypeVar("V")


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class SingleFlight:
    """One computation per key at a time: whoever asks for a key while it is being computed
    waits for that computation and shares its result (concurrent first clicks on an image
    download and segment it once). A waiter whose owner failed with a time limit or a shutdown
    (503, 504) or an unexpected error tries itself; other errors (bad input, 404, 413) are
    shared."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Any, _Flight] = {}

    def do(self, key: Any, compute: Callable[[], V], check: Callable[[], None] | None = None) -> V:
        """``compute()`` unless the same key is being computed; ``check()`` (a deadline) is
        called every 0.1 s while waiting."""
        while True:
            with self._lock:
                flight = self._flights.get(key)
                owner = flight is None
                if owner:
                    flight = self._flights[key] = _Flight()
            if owner:
                try:
                    flight.value = compute()
                    return flight.value
                except BaseException as exc:
                    flight.error = exc
                    raise
                finally:
                    with self._lock:
                        self._flights.pop(key, None)
                    flight.done.set()
            while not flight.done.wait(0.1):
                if check is not None:
                    check()
            if flight.error is None:
                return flight.value
            if isinstance(flight.error, BackendError) and flight.error.status not in (503, 504):
                raise flight.error
            # else: compute it ourselves (the loop makes this caller the owner)


class LabelStudioLink:
    """Where Label Studio is and which key goes there (module docstring: "Which host gets which
    key").

    The operator's ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` are never replaced by a
    /setup request, and the configured key only ever goes to the configured URL. Without a
    configured URL, the hostname a /setup request names is used only with the token of that
    same request (both are replaced together by a later /setup). With a configured URL and no
    configured key, the token /setup sends is used for the configured URL.
    """

    def __init__(self, url: str | None, api_key: str | None) -> None:
        self.configured_url = url.rstrip("/") if url else None
        self.configured_key = api_key or None
        self._learned: tuple[str | None, str | None] = (None, None)  # (hostname, token) of one /setup
        self._lock = threading.Lock()

    @property
    def url_configured(self) -> bool:
        return self.configured_url is not None

    @property
    def key_configured(self) -> bool:
        return self.configured_key is not None

    def current(self) -> tuple[str | None, str | None]:
        """(URL, key) as one consistent pair (module docstring)."""
        with self._lock:
            host, token = self._learned
        if self.configured_url is not None:
            return self.configured_url, self.configured_key or token
        return host, token  # a configured key never goes to a learnt host

    @property
    def url(self) -> str | None:
        return self.current()[0]

    @url.setter
    def url(self, value: str | None) -> None:  # the operator's (and the tests') override
        self.configured_url = value.rstrip("/") if value else None

    @property
    def api_key(self) -> str | None:
        return self.current()[1]

    def update_from_setup(self, hostname: Any, token: Any) -> None:
        """Remember the hostname and token of a /setup request, as one pair (class docstring)."""
        host = hostname.rstrip("/") if isinstance(hostname, str) and _is_base_url(hostname) else None
        key = token if isinstance(token, str) and token and _printable(token) else None
        with self._lock:
            if self.configured_url is not None:
                if key is not None:
                    self._learned = (None, key)
            elif host is not None:
                self._learned = (host, key)

    def require(self, what: str) -> tuple[str, str]:
        url, key = self.current()
        if not url:
            raise BackendError(f"{what}: Label Studio's address is unknown; set LABEL_STUDIO_URL "
                               "(or connect the backend from Label Studio, which sends it)", 502)
        if not key:
            if self.configured_key is not None and self.configured_url is None:
                raise BackendError(
                    f"{what}: no API key for {url} (learnt from Label Studio's /setup request): "
                    "LABEL_STUDIO_API_KEY is only ever sent to LABEL_STUDIO_URL; set "
                    "LABEL_STUDIO_URL too", 502)
            raise BackendError(f"{what}: no API key for Label Studio; set LABEL_STUDIO_API_KEY", 502)
        return url, key


def _printable(text: str) -> bool:
    """No control characters (they would split a header or a request line)."""
    return not any(ord(c) < 32 or ord(c) == 127 for c in text)


def _is_base_url(text: str) -> bool:
    """An http(s) URL with a host, usable as Label Studio's address."""
    if not _printable(text) or not text.startswith(("http://", "https://")):
        return False
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return False
    return bool(parts.hostname)


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
    if not _printable(relative):
        raise BackendError(f"{url[:200]!r}: local-files path with control characters")
    normal = posixpath.normpath(relative.replace("\\", "/")).lstrip("/")
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise BackendError(f"{url}: local-files path {relative!r} escapes the document root")
    return normal


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """RGB uint8 pixels of an image file's bytes in the displayed frame (EXIF orientation
    applied, as Label Studio's editor shows it), read by ``mosaic_toolkit.core.imageio`` like every
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


def _task_number(task_id: Any) -> int:
    """A task id as the integer the presign endpoint takes; a 400 error for anything else."""
    if isinstance(task_id, int) and not isinstance(task_id, bool) and task_id >= 0:
        return task_id
    if isinstance(task_id, str) and task_id.isascii() and task_id.isdigit() and len(task_id) < 20:
        return int(task_id)
    raise BackendError(f"task {str(task_id)[:100]!r}: a cloud storage image needs an integer task id "
                       "(it is fetched through /tasks/<id>/presign/)")


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
        self._flights = SingleFlight()  # concurrent requests for one image: one download

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------- URLs
    def resolve(self, reference: str, task_id: Any) -> str | Path:
        """The absolute Label Studio URL of an image reference, or a local file for local-files
        URLs under a shared document root. Only ``/data/...`` paths (normalised: no dot
        segments, encoded or not, no backslashes or control characters) and the presign
        endpoint of an integer task id are ever fetched; anything else is a 400 error."""
        if not isinstance(reference, str) or not reference.strip():
            raise BackendError(f"task {task_id}: the image reference is empty")
        ref = reference.strip()
        shown = repr(ref[:200])
        if len(ref) > MAX_REFERENCE:
            raise BackendError(f"task {task_id}: image reference {shown} is longer than {MAX_REFERENCE} characters")
        if not _printable(ref):
            raise BackendError(f"task {task_id}: image reference {shown} holds control characters")
        if ref.startswith(("upload/", "/upload/")):
            ref = "/data/" + ref.lstrip("/")
        if ref.startswith(CLOUD_SCHEMES):
            number = _task_number(task_id)
            base, _ = self.link.require(f"task {task_id}")
            fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
            return f"{base}/tasks/{number}/presign/?fileuri={fileuri}"
        try:
            parts = urlsplit(ref)
        except ValueError as exc:
            raise BackendError(f"task {task_id}: image reference {shown} is not a URL ({exc})") from exc
        path = parts.path
        if parts.scheme in ("http", "https"):
            base, _ = self.link.require(f"task {task_id}")
            if _origin(ref) != _origin(base):
                raise BackendError(
                    f"task {task_id}: image {shown} is not on the Label Studio host {base}; "
                    "the backend only fetches images from Label Studio")
            prefix = urlsplit(base).path.rstrip("/")  # Label Studio under a sub-path
            if prefix and path.startswith(prefix + "/"):
                path = path[len(prefix):]
        elif parts.scheme or parts.netloc or not ref.startswith("/"):
            raise BackendError(
                f"task {task_id}: image reference {shown} is not a Label Studio URL "
                "(/data/upload/..., /data/local-files/?d=..., s3://... or http(s) on its host)")
        else:
            base, _ = self.link.require(f"task {task_id}")
        decoded = unquote(path)
        if "\\" in decoded or not _printable(decoded) or \
                any(segment in (".", "..") for segment in decoded.split("/")):
            raise BackendError(f"task {task_id}: image reference {shown} has a path that is not normalised "
                               "(dot segments, backslashes or encoded control characters)")
        if not decoded.startswith(DATA_PREFIX):
            raise BackendError(f"task {task_id}: image reference {shown} is not under {DATA_PREFIX} "
                               "(the backend fetches only Label Studio's /data/ files)")
        url = base + path + (f"?{parts.query}" if parts.query else "")
        if path.rstrip("/") == "/data/local-files":
            try:
                relative = local_files_path(url)
            except BackendError as exc:
                raise BackendError(f"task {task_id}: {exc}") from exc
            root = self.settings.local_files_root
            if root is not None:
                return self._local_file(root, relative, task_id)
        return url

    @staticmethod
    def _local_file(root: Path, relative: str, task_id: Any) -> Path:
        """The file under the shared document root (404 when it is not there: Label Studio
        serves the same folder, so fetching it over HTTP would not find it either)."""
        try:
            base = root.resolve()
            path = (base / relative).resolve()
            if not path.is_relative_to(base):
                raise BackendError(f"task {task_id}: local-files path {relative!r} escapes the document root")
            if not path.is_file():
                raise BackendError(f"task {task_id}: image {relative!r} not found under the local-files "
                                   f"root {root} (LOCAL_FILES_DOCUMENT_ROOT)", 404)
            return path
        except (OSError, ValueError) as exc:
            raise BackendError(f"task {task_id}: local-files path {relative[:200]!r} cannot be used ({exc})") from exc

    # ---------------------------------------------------------------- downloads
    def image(self, reference: str, task_id: Any) -> tuple[np.ndarray, str]:
        """The RGB pixels of a task's image (read-only, cached) and a hash of their content
        (the key of the backend's per-image caches)."""
        source = self.resolve(reference, task_id)
        cached = self.cache.get(str(source))
        if cached is not None:
            return cached
        return self._flights.do(str(source), lambda: self._load(source, reference, task_id))

    def _load(self, source: str | Path, reference: str, task_id: Any) -> tuple[np.ndarray, str]:
        """Download (or read) and decode one image, once for concurrent requests."""
        cached = self.cache.get(str(source))  # a request that just finished may have put it
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

    def _auth_header(self, base: str, key: str, refresh: bool = False) -> dict[str, str]:
        """The Authorization header for ``key`` on ``base`` (one pair of LabelStudioLink)."""
        if key.count(".") != 2:  # a legacy token
            return {"Authorization": f"Token {key}"}
        with self._access_lock:  # a personal access token: exchange it for an access token
            if refresh or self._access is None or self._access[0] != (base, key):
                try:
                    answer = self._client.post(f"{base}/api/token/refresh", json={"refresh": key})
                    answer.raise_for_status()
                    self._access = ((base, key), answer.json()["access"])
                except (httpx.HTTPError, httpx.InvalidURL, ValueError, KeyError, TypeError) as exc:
                    raise BackendError(f"{base}: cannot exchange the personal access token "
                                       f"({type(exc).__name__}: {exc})", 502) from exc
            return {"Authorization": f"Bearer {self._access[1]}"}

    def _download(self, url: str, name: str) -> bytes:
        """GET ``url`` from Label Studio (following its redirects), capped in size. The key
        goes only to the address it belongs to (``LabelStudioLink.require``), never to a host
        a redirect leads to."""
        base, key = self.link.require(name)
        retried = False
        hops = 0
        while True:
            on_ls = _origin(url) == _origin(base)
            headers = self._auth_header(base, key) if on_ls else {}
            try:
                with self._client.stream("GET", url, headers=headers) as response:
                    if response.is_redirect and hops < MAX_REDIRECTS:
                        url = urljoin(url, response.headers.get("location", ""))
                        hops += 1
                        continue
                    if response.status_code == 401 and on_ls and not retried and headers and \
                            headers["Authorization"].startswith("Bearer"):
                        self._auth_header(base, key, refresh=True)
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
            except (httpx.InvalidURL, ValueError) as exc:  # a bad URL, or a redirect to one
                status = 502 if hops else 400
                raise BackendError(f"{name}: cannot fetch {url[:200]!r} ({type(exc).__name__}: {exc})",
                                   status) from exc

    @staticmethod
    def _http_error(name: str, url: str, status: int) -> BackendError:
        if status in (401, 403):
            why = "refused the API key (check LABEL_STUDIO_API_KEY)"
        elif status == 404:
            return BackendError(f"{name}: not found on Label Studio (HTTP 404, {url})", 404)
        else:
            why = "failed"
        return BackendError(f"{name}: Label Studio {why} (HTTP {status}, {url})", 502)
