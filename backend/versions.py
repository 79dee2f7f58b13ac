"""Model versions on disk and the engines serving them.

The models folder (``MOSAIC_BACKEND_MODELS``)::

    current                        the name of the version to serve, one line; replaced
                                   atomically (written aside, then renamed)
    versions/<version>/finetune.pt a fine-tune file (prompt encoder + mask decoder)
    versions/<version>/version.json  when and how it was made: run, project, validation Dice
    runs/<run id>/                 training runs (see jobs.py)

A version's name is the model version the toolkit gives its weights
(``mosaic_toolkit.sam.models.model_version``: ``<base>+ft-<sha256 prefix>``). The base model itself
(the ``--model`` the server started with, or ``classical``) is always a version too; with no
``current`` file it is the one served.

A broken version (a ``version.json`` that is not a JSON object, a fine-tune file that cannot
be loaded) or a broken ``current`` pointer (not UTF-8 text, a folder, not a version name) is
skipped with a one-line warning in the log and in ``/health``; the server then starts on (or
keeps) the model it can serve, and ``GET /versions`` says which versions are broken and why.

``EngineManager`` loads the base engine at start-up, then serves the version named by
``current`` (or pinned by ``MOSAIC_BACKEND_MODEL_VERSION``). When ``current`` changes (a
training run of this or another server process finished, or ``POST /versions/current``), the
new engine is loaded beside the old one, which keeps answering until the new one is ready; the
swap is then a single reference assignment, so every request runs entirely on one version.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mosaic_toolkit.sam import weights
from mosaic_toolkit.classical import ClassicalEngine
from mosaic_toolkit.core.io import atomic_file
from mosaic_toolkit.core.errors import MosaicError
from mosaic_toolkit.engines import CLASSICAL_VERSION, Engine, engine_version, open_engine, resolve_kind

from .config import Settings
from .errors import BackendError

log = logging.getLogger(__name__)

POINTER = "current"
FINETUNE = "finetune.pt"
METADATA = "version.json"
MAX_LOADED = 3  # engines kept in memory: the active one, the base, one more asked for by name
MAX_POINTER_BYTES = 1024  # a ``current`` file larger than this is not a version name



def valid_version_name(name: str) -> bool:
    """A version name that is safe as a folder name (no separators, not hidden)."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") \
        and name == name.strip() and len(name) <= 200 and all(32 <= ord(c) != 127 for c in name)


def one_line(text: str, limit: int = 300) -> str:
    """A message on one line (log, /health), at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class ModelStore:
    """The models folder (module docstring)."""

    root: Path

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def read_current(self) -> tuple[str | None, str | None]:
        """(the version named by ``current`` or None when there is none, None) or, when the
        file cannot be used, (None, why)."""
        path = self.root / POINTER
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_POINTER_BYTES + 1)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, f"{path}: cannot be read ({exc.strerror or type(exc).__name__})"
        if len(data) > MAX_POINTER_BYTES:
            return None, f"{path}: more than {MAX_POINTER_BYTES} bytes, not a version name"
        try:
            name = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, f"{path}: not a version name (not UTF-8 text)"
        if not name:
            return None, None
        if not valid_version_name(name):
            return None, f"{path}: {one_line(repr(name), 80)} is not a valid version name"
        return name, None

    def current(self) -> str | None:
        """The version named by ``current``, or None when there is none (or it is broken)."""
        return self.read_current()[0]

    def pointer_stamp(self) -> tuple[int, int] | None:
        """(mtime, inode) of ``current``: changes whenever it is replaced."""
        try:
            st = (self.root / POINTER).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def set_current(self, name: str) -> None:
        with atomic_file(self.root / POINTER) as tmp:
            tmp.write_text(name + "\n", encoding="utf-8")

    def finetune(self, name: str) -> Path:
        """The fine-tune file of a stored version; 404 when there is none."""
        path = self.versions_dir / name / FINETUNE
        if not valid_version_name(name) or not path.is_file():
            raise BackendError(f"model version {name!r}: unknown (GET /versions lists them)", 404)
        return path

    def read_metadata(self, name: str) -> tuple[dict[str, Any], str | None]:
        """(a version's ``version.json``, None), ({}, None) without one, or ({}, why) when it
        is broken (unreadable, not JSON, not a JSON object)."""
        path = self.versions_dir / name / METADATA
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}, None
        except OSError as exc:
            return {}, f"{METADATA} cannot be read ({exc.strerror or type(exc).__name__})"
        except ValueError as exc:  # also UnicodeDecodeError
            return {}, f"{METADATA} is not valid JSON ({one_line(str(exc), 100)})"
        if not isinstance(data, dict):
            return {}, f"{METADATA} is not a JSON object (a {type(data).__name__})"
        return data, None

    def metadata(self, name: str) -> dict[str, Any]:
        return self.read_metadata(name)[0]

    def names(self) -> list[str]:
        """Stored versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = [p for p in self.versions_dir.iterdir()
                 if valid_version_name(p.name) and (p / FINETUNE).is_file()]
        return [p.name for p in sorted(found, key=lambda p: ((p / FINETUNE).stat().st_mtime_ns, p.name))]


class EngineManager:
    """The loaded engines and which one serves (module docstring)."""

    def __init__(self, settings: Settings, store: ModelStore, base: Engine | None = None) -> None:
        self.settings = settings
        self.store = store
        self.base = base if base is not None else load_base_engine(settings)
        self.base_version = engine_version(self.base)
        self._loaded: OrderedDict[str, Engine] = OrderedDict({self.base_version: self.base})
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Event] = {}
        self.last_error: str | None = None
        self.broken: dict[str, str] = {}  # versions that failed to load, and why
        self._stamp = store.pointer_stamp()
        self._active = self.base
        wanted = settings.model_version
        if not wanted:
            wanted, problem = store.read_current()
            if problem:
                self._warn(f"{problem}; serving the base model {self.base_version}")
        wanted = wanted or self.base_version
        try:
            self._active = self.engine_for(wanted)
        except BackendError as exc:  # keep serving the base model, and say why
            self._warn(f"cannot serve {wanted!r}: {exc}; serving the base model {self.base_version}")

    @property
    def trainable(self) -> bool:
        return not isinstance(self.base, ClassicalEngine)

    @property
    def active(self) -> Engine:
        """The engine serving requests now (follows ``current`` unless a version is pinned)."""
        if not self.settings.model_version:
            self._follow_pointer()
        return self._active

    @property
    def active_version(self) -> str:
        return engine_version(self.active)

    def versions(self) -> list[dict[str, Any]]:
        """Every selectable version: the base model, then the stored ones (oldest first)."""
        active = self.active_version
        rows = [{"version": self.base_version, "base": True, "active": active == self.base_version}]
        for name in self.store.names():
            metadata, problem = self.store.read_metadata(name)
            row = {**metadata, "version": name, "base": False, "active": active == name}
            why = problem or self.broken.get(name)
            if why:
                row["broken"] = why
            rows.append(row)
        return rows

    def _warn(self, message: str) -> None:
        """A problem that does not stop serving: one line in the log and in /health."""
        self.last_error = one_line(message)
        log.warning("%s", self.last_error)

    def engine_for(self, version: str | None) -> Engine:
        """The engine of ``version`` (the active one for None), loading it if needed."""
        if version is None:
            return self.active
        with self._lock:
            engine = self._loaded.get(version)
            if engine is not None:
                self._loaded.move_to_end(version)
                return engine
        if version != self.base_version and valid_version_name(version):
            problem = self.store.read_metadata(version)[1] or self.broken.get(version)
            if problem:
                raise BackendError(f"model version {version!r} is broken: {problem}", 409)
        with self._lock:
            event = self._loading.get(version)
            owner = event is None
            if owner:
                event = self._loading[version] = threading.Event()
        if not owner:  # another thread loads it: wait for that
            event.wait()
            with self._lock:
                engine = self._loaded.get(version)
            if engine is None:
                raise BackendError(f"model version {version!r}: could not be loaded (see the log)", 503)
            return engine
        try:
            try:
                engine = self._load(version)
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 (a corrupt file: the version is broken)
                why = one_line(f"cannot be loaded ({type(exc).__name__}: {exc})")
                self.broken[version] = why
                log.warning("model version %s %s", version, why)
                raise BackendError(f"model version {version!r} is broken: {why}", 409) from exc
            with self._lock:
                self._loaded[version] = engine
                self._evict()
            return engine
        finally:
            with self._lock:
                self._loading.pop(version, None)
            event.set()

    def switch(self, version: str) -> Engine:
        """Serve ``version`` from now on: load it, then point ``current`` at it, then swap.

        A server pinned to a version (MOSAIC_BACKEND_MODEL_VERSION) only moves the pointer,
        for the other servers sharing the models folder, and keeps serving its pinned version.
        """
        engine = self.engine_for(version)
        self.store.set_current(version)
        if self.settings.model_version:
            log.info("model version %s is current now; this server stays pinned to %s",
                     version, self.settings.model_version)
            return self._active
        with self._lock:
            self._stamp = self.store.pointer_stamp()
            self._active = engine
            self.last_error = None
        log.info("now serving model version %s", version)
        return engine

    # ---------------------------------------------------------------- internals
    def _load(self, version: str) -> Engine:
        if version == self.base_version:
            return self.base
        if not self.trainable:
            raise BackendError(f"model version {version!r}: the classical engine has no other versions", 404)
        path = self.store.finetune(version)
        log.info("loading model version %s from %s", version, path)
        # Reported as the folder's name, whatever the base is called here.
        return _open(
            "sam2", path, self.settings.device, self.settings.generator_params,
            cache_bytes=self.settings.embedding_cache_mb * 2**20, base=self.base.spec.base_checkpoint,
            image_size=self.settings.image_size, version=version)

    def _evict(self) -> None:
        keep = {self.base_version, engine_version(self._active)}
        for name in list(self._loaded):
            if len(self._loaded) <= MAX_LOADED:
                break
            if name not in keep:
                del self._loaded[name]

    def _follow_pointer(self) -> None:
        """Notice a replaced ``current`` file (a stat) and load its version in the background."""
        stamp = self.store.pointer_stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
        wanted, problem = self.store.read_current()
        if problem:
            self._warn(f"{problem}; still serving {engine_version(self._active)}")
            return
        wanted = wanted or self.base_version
        if wanted == engine_version(self._active):
            self.last_error = None
            return
        threading.Thread(target=self._adopt, args=(wanted,), name=f"load {wanted}", daemon=True).start()

    def _adopt(self, version: str) -> None:
        try:
            engine = self.engine_for(version)
        except Exception as exc:  # noqa: BLE001 (runs in a thread: report, never raise)
            self._warn(f"cannot serve {version!r}: {exc}; still serving {engine_version(self._active)}")
            return
        if (self.store.current() or self.base_version) == version:
            self._active = engine
            self.last_error = None
            log.info("now serving model version %s", version)


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------
def _open(*args: Any, **kwargs: Any) -> Engine:
    """``open_engine``, its errors as BackendError (a model the backend cannot serve)."""
    try:
        return open_engine(*args, **kwargs)
    except BackendError:
        raise
    except MosaicError as exc:
        raise BackendError(str(exc)) from exc


def load_base_engine(settings: Settings) -> Engine:
    """The engine named by the settings: SAM 2 (given or best installed model) or classical.

    MOSAIC_BACKEND_GENERATOR_PARAMS are given to SAM 2 as it is opened (the classical engine
    has no generator).
    """
    kind = resolve_kind(settings.engine, settings.model)
    log.info("engine: %s", "classical (no SAM 2 weights)" if kind == "classical"
             else f"SAM 2 {settings.model or weights.default_model()}")
    return _open(kind, settings.model, settings.device, settings.generator_params,
                       cache_bytes=settings.embedding_cache_mb * 2**20, image_size=settings.image_size,
                       output=None if settings.model_output == "auto" else settings.model_output,
                       base=settings.model_base)


def job_base_spec(engine: Engine) -> dict[str, Any]:
    """The ModelSpec of a SAM 2 engine as JSON, for a training worker to start from."""
    return engine.spec.to_json()
