"""Install, start and stop a real Label Studio server for end-to-end tests.

Plain helper code (no pytest), so it also works from a shell:

    python tests/labelstudio_server.py install   # once, ~2.5 min pip + ~1 min migrations; prints the executable
    python tests/labelstudio_server.py serve     # start a throw-away server and keep it up until Ctrl-C

Label Studio lives in its own virtual environment because its pinned dependencies conflict with the
project's. The venv sits in <repo>/.cache/labelstudio-venv (git-ignored, kept between runs on the same
machine); set MOSAIC_LS_VENV to put it elsewhere. The install also keeps an empty migrated database in
the venv, which every server copies, so a server starts in ~5 s instead of 35-100 s. Only the standard
library is used here, except in LabelStudioServer.client(), which imports the Label Studio SDK of the
calling environment (the project's venv).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

LS_VERSION = "1.23.2"
# Label Studio 1.23.2 asks for sentry-sdk>=2.16 and does not start with sentry-sdk 3 ("Unknown option
# 'send_default_pii'"), which pip picks today.
LS_CONSTRAINTS = ("sentry-sdk<3",)
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO_ROOT / ".cache" / "labelstudio-venv"
INSTALL_TIMEOUT_S = 1800
START_TIMEOUT_S = 180.0
# Settings for every Label Studio process started here: a SQLite database, no calls to the internet.
SERVER_SETTINGS = {"DJANGO_DB": "sqlite", "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false"}


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed, started or reached; the message says why."""


def default_venv() -> Path:
    """The Label Studio venv: $MOSAIC_LS_VENV if set, else <repo>/.cache/labelstudio-venv."""
    return Path(os.environ.get("MOSAIC_LS_VENV") or DEFAULT_VENV).expanduser().resolve()


def _clean_env() -> dict[str, str]:
    """The caller's environment without anything that would make the LS venv see another Python."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "DJANGO_SETTINGS_MODULE"):
        env.pop(name, None)
    return env


def _tail(path: Path, lines: int = 40) -> str:
    """The last lines of a text file (or a note that it is missing), to put into error messages."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError as exc:
        return f"(no log: {exc})"


def installed_version(venv: Path) -> str | None:
    """The label-studio version installed in `venv`, or None if it (or its executable) is missing.

    Asks the venv's package metadata rather than `label-studio --version`: in 1.23.2 that command
    prints the version and then goes on to migrate a database in ~/.local/share and serve on :8080.
    """
    python, executable = venv / "bin" / "python", venv / "bin" / "label-studio"
    if not (python.exists() and executable.exists()):
        return None
    try:
        proc = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
                              capture_output=True, text=True, timeout=60, env=_clean_env(),
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, so that two processes never install into one venv together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def template_database(venv: Path) -> Path:
    """Where ensure_installed keeps an empty, fully migrated database for new servers to copy.

    Migrating a fresh SQLite database takes 35-100 s on a small machine; copying it takes none,
    so every server after the install starts in about 5 s.
    """
    return venv / "mosaic-migrated.sqlite3"


def _run_logged(command: list[str], log: IO[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run one install step with its output appended to `log`; LabelStudioError with the tail if it fails."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    try:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env or _clean_env(),
                              stdin=subprocess.DEVNULL, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LabelStudioError(f"'{' '.join(command)}': took over {INSTALL_TIMEOUT_S} s; see {log_path}") from None
    if proc.returncode != 0:
        raise LabelStudioError(f"'{' '.join(command)}': failed (exit {proc.returncode}); "
                               f"last lines of {log_path}:\n{_tail(log_path)}")


def _build_template_database(venv: Path, log: IO[str], log_path: Path) -> None:
    """Apply Label Studio's migrations to a new SQLite database and store it at template_database(venv)."""
    manage = next(venv.glob("lib/python*/site-packages/label_studio/manage.py"), None)
    if manage is None:
        raise LabelStudioError(f"{venv}: label_studio/manage.py not found in the venv")
    with tempfile.TemporaryDirectory(dir=venv) as data_dir:
        env = {**_clean_env(), **SERVER_SETTINGS, "LABEL_STUDIO_BASE_DATA_DIR": data_dir}
        _run_logged([str(venv / "bin" / "python"), str(manage), "migrate", "--no-color"], log, log_path, env)
        os.replace(Path(data_dir) / "label_studio.sqlite3", template_database(venv))


def ensure_installed(venv: Path | None = None) -> Path:
    """Install label-studio==LS_VERSION and its migrated template database into `venv` unless both are
    there already; return the label-studio executable.

    Safe to call from several processes at once (a lock file next to the venv serialises installs).
    The output goes to <venv>.install.log; on failure its tail is in the LabelStudioError.
    """
    venv = Path(venv) if venv is not None else default_venv()
    try:
        if not _is_installed(venv):
            with _file_lock(venv.with_name(venv.name + ".lock")):
                if not _is_installed(venv):  # else another process installed it while this one waited
                    _install(venv)
    except OSError as exc:
        raise LabelStudioError(f"{venv}: cannot install Label Studio there: {exc}") from exc
    return venv / "bin" / "label-studio"


def _is_installed(venv: Path) -> bool:
    """True when `venv` holds label-studio==LS_VERSION and the template database."""
    return template_database(venv).exists() and installed_version(venv) == LS_VERSION


def _install(venv: Path) -> None:
    """Create the venv and pip-install Label Studio if needed, then build the template database."""
    log_path = venv.with_name(venv.name + ".install.log")
    with open(log_path, "w") as log:
        if installed_version(venv) != LS_VERSION:
            template_database(venv).unlink(missing_ok=True)
            if not (venv / "bin" / "python").exists():
                _run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], log, log_path)
            _run_logged([str(venv / "bin" / "python"), "-m", "pip", "install", f"label-studio=={LS_VERSION}",
                         *LS_CONSTRAINTS], log, log_path)
            version = installed_version(venv)
            if version != LS_VERSION:
                raise LabelStudioError(f"{venv}: has label-studio {version!r} after the install, "
                                       f"expected {LS_VERSION}; see {log_path}")
        _build_template_database(venv, log, log_path)


def _parent_death_signal() -> Callable[[], None] | None:
    """A function for Popen's preexec_fn that makes the child get SIGTERM when its parent dies (Linux),
    so that a killed test run leaves no server behind; stop() handles the normal case.

    libc is loaded here, in the parent, so the forked child only makes the one system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabelStudioServer:
    """A throw-away Label Studio server on 127.0.0.1 with its own data folder and one admin user.

    Use as a context manager (or call start() and stop()). The admin logs in with `username` /
    `password`; API calls use the legacy token `token` (header "Authorization: Token <token>").
    Files put under `document_root` are served as /data/local-files/?d=<relative path> (local_file_url)
    once a project has a local-files storage on a subfolder that holds them (add_local_storage).
    """

    def __init__(self, executable: Path | None = None, *, port: int | None = None,
                 username: str = "mosaic@example.com", password: str | None = None,
                 start_timeout: float = START_TIMEOUT_S) -> None:
        self.executable = Path(executable) if executable is not None else default_venv() / "bin" / "label-studio"
        self.port = port
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.token = secrets.token_hex(20)  # 40 hex characters, the legacy token format
        self.start_timeout = start_timeout
        self.workdir: Path | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        """LABEL_STUDIO_BASE_DATA_DIR: the database, uploads and exports of this server."""
        return self._require_workdir() / "data"

    @property
    def document_root(self) -> Path:
        """LOCAL_FILES_DOCUMENT_ROOT: files below it can be served to tasks (see add_local_storage)."""
        return self._require_workdir() / "files"

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr."""
        return self._require_workdir() / "server.log"

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:40533 (no trailing slash)."""
        if self.port is None:
            raise LabelStudioError("Label Studio server: not started")
        return f"http://127.0.0.1:{self.port}"

    def _require_workdir(self) -> Path:
        if self.workdir is None:
            raise LabelStudioError("Label Studio server: not started")
        return self.workdir

    def environment(self) -> dict[str, str]:
        """The environment the server runs with: fresh data folder, admin user, token, local files."""
        return {
            **_clean_env(),
            **SERVER_SETTINGS,
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # otherwise the token above is refused
            "USE_DEFAULT_BANNED_SUBNETS": "false",  # otherwise an ML backend on 127.0.0.1 is refused
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
        }

    def start(self) -> "LabelStudioServer":
        """Start the server in a new temporary work folder and wait until /health answers.

        On failure: LabelStudioError with the tail of the server log; the work folder is kept.
        """
        if self._process is not None:
            raise LabelStudioError(f"Label Studio server at {self.url}: already started")
        if not self.executable.exists():
            raise LabelStudioError(f"{self.executable}: not found; run ensure_installed() first")
        self.workdir = Path(tempfile.mkdtemp(prefix="mosaic-labelstudio-"))
        self.data_dir.mkdir()
        self.document_root.mkdir()
        template = template_database(self.executable.parent.parent)
        if template.exists():  # else the server migrates a new database itself, which is slow
            shutil.copyfile(template, self.data_dir / "label_studio.sqlite3")
        if self.port is None:
            self.port = free_port()
        command = [str(self.executable), "start", "--no-browser", "--host", self.url,
                   "--internal-host", "127.0.0.1", "--port", str(self.port),
                   "--data-dir", str(self.data_dir)]
        began = time.monotonic()
        try:
            with open(self.log_path, "w") as log:
                self._process = subprocess.Popen(command, cwd=self.workdir, env=self.environment(),
                                                 stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True,
                                                 preexec_fn=_parent_death_signal())
        except OSError as exc:
            raise LabelStudioError(f"{self.executable}: cannot start it: {exc}") from exc
        try:
            self._wait_until_up(began)
        except BaseException:
            self.stop(keep_workdir=True)
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_until_up(self, began: float) -> None:
        """Poll GET /health until it answers 200, the process dies, or start_timeout passes."""
        assert self._process is not None
        while True:
            code = self._process.poll()
            if code is not None:
                raise LabelStudioError(f"Label Studio server at {self.url}: exited with status {code} "
                                       f"while starting; last lines of {self.log_path}:\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - began > self.start_timeout:
                raise LabelStudioError(f"Label Studio server at {self.url}: not up after "
                                       f"{self.start_timeout:.0f} s; last lines of {self.log_path}:\n"
                                       f"{_tail(self.log_path)}")
            time.sleep(1.0)

    def stop(self, keep_workdir: bool = False) -> None:
        """Stop the server's whole process group; delete the work folder unless keep_workdir."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if self.workdir is not None and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LabelStudioServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def client(self) -> LabelStudio:
        """A Label Studio SDK client (label_studio_sdk.LabelStudio) logged in with the API token."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token)

    def local_file_url(self, path: Path | str) -> str:
        """The task-data URL under which the server serves `path` (a file inside document_root)."""
        relative = Path(path).resolve().relative_to(self.document_root.resolve())
        return "/data/local-files/?d=" + urllib.parse.quote(relative.as_posix())

    def add_local_storage(self, project_id: int, folder: Path | str) -> int:
        """Let project `project_id` read the files under `folder`; create the folder; return the storage id.

        Label Studio serves /data/local-files/?d=... only for files inside the path of a local-files
        storage of a project the user may see, and refuses document_root itself as that path, so
        `folder` must be a subfolder of document_root (e.g. document_root / "project-1").
        """
        folder = Path(folder).resolve()
        if folder == self.document_root.resolve() or not folder.is_relative_to(self.document_root.resolve()):
            raise LabelStudioError(f"{folder}: a local-files storage must be a subfolder of {self.document_root}")
        folder.mkdir(parents=True, exist_ok=True)
        storage = self.client().import_storage.local.create(
            project=project_id, path=str(folder), title=folder.name, use_blob_urls=False)
        return storage.id

    def download(self, path: str) -> bytes:
        """GET `path` (e.g. a task's image URL) from the server with the API token; return the body."""
        request = urllib.request.Request(urllib.parse.urljoin(self.url, path),
                                         headers={"Authorization": f"Token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()


def main(argv: list[str] | None = None) -> int:
    """Command line: `install` (print the executable) or `serve` (run a server until Ctrl-C)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install", "serve"], help="what to do")
    parser.add_argument("--venv", type=Path, default=None,
                        help=f"the Label Studio venv (default: $MOSAIC_LS_VENV or {DEFAULT_VENV})")
    args = parser.parse_args(argv)
    try:
        executable = ensure_installed(args.venv)
        print(executable)
        if args.action == "serve":
            with LabelStudioServer(executable) as server:
                print(f"Label Studio {LS_VERSION} at {server.url} (up in {server.startup_seconds:.0f} s)\n"
                      f"  user {server.username} / {server.password}, API token {server.token}\n"
                      f"  document root {server.document_root}, log {server.log_path}\nCtrl-C stops it.", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
    except LabelStudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
