"""Start and stop a local `tritonserver` from the nvidia-pytriton wheel, on free 127.0.0.1 ports.

The wheel's binary needs a little help on a plain machine (see the design's conventions): the
Python backend stub matching this interpreter copied into a backends folder, this venv's `bin`
first on PATH (the stub finds its site-packages through `python3`), and the interpreter's LIBDIR
plus the wheel's bundled libraries on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from inferline.adapters.base import ServerHandle
from inferline.errors import ServerError

READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path
    stub: Path
    libs: Path


def find_install() -> TritonInstall:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "the embedded tritonserver is not installed (no nvidia-pytriton package)",
            "pip install 'inferline[triton]'",
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=root.parent.parent / "nvidia_pytriton.libs",
    )
    for path, what in ((install.binary, "tritonserver binary"), (install.stub, f"Python {version} backend stub")):
        if not path.exists():
            raise ServerError(f"the {what} is missing at {path}", "reinstall nvidia-pytriton for this Python version")
    return install


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> tuple[int, ...]:
    """Distinct free ports: all held open together while choosing, since the kernel may hand back a port
    just closed, and Triton refuses to start (printing its usage) when two services share one."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return tuple(ports)


def server_env(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [p for p in (libdir, str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    return env


def prepare_backends(install: TritonInstall, into: Path) -> Path:
    backends = into / "backends"
    if not backends.exists():
        shutil.copytree(install.backends, backends)
        shutil.copy2(install.stub, backends / "python" / install.stub.name)
        utils = install.stub.parent / "triton_python_backend_utils.py"
        if utils.exists():
            shutil.copy2(utils, backends / "python" / utils.name)
    return backends


class EmbeddedTriton:
    """A `tritonserver` process serving `repository` with explicit model control.

    Use as a context manager, or call `start()` and `stop()`; `stop()` is safe to call twice and
    also stops the Python backend's stub processes (the server runs in its own process group).
    """

    def __init__(
        self,
        repository: str | Path,
        models: Sequence[str] = (),
        workdir: str | Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.models = tuple(models)
        self.ready_timeout_s = ready_timeout_s
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="inferline-triton-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.grpc_port = self.http_port = self.metrics_port = 0
        self.startup_s = 0.0

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    def start(self) -> EmbeddedTriton:
        if not self.repository.is_dir():
            raise ServerError(
                f"model repository {self.repository} does not exist", "pass a folder with one subfolder per model"
            )
        missing = [m for m in self.models if not (self.repository / m).is_dir()]
        if missing:
            raise ServerError(
                f"model(s) {missing} not found in the repository {self.repository}",
                f"choose from {sorted(p.name for p in self.repository.iterdir() if p.is_dir())}",
            )
        install = find_install()
        backends = prepare_backends(install, self.workdir)
        started = time.perf_counter()
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
            self._spawn(install, backends)
            try:
                self._wait_ready()
                break
            except ServerError:
                # gRPC says "Socket '...' already in use", HTTP "Address already in use".
                port_clash = "already in use" in self.log_tail().lower()
                self.stop(keep_workdir=True)
                if not port_clash or attempt == 2:
                    raise
        self.startup_s = time.perf_counter() - started
        return self

    def _spawn(self, install: TritonInstall, backends: Path) -> None:
        args = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=server_env(install), start_new_session=True
        )
        log.close()

    def _wait_ready(self) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.ready_timeout_s
        url = f"http://{self.http_address}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited during start-up (code {self.process.returncode if self.process else '?'}): "
                    f"{self.log_tail(1)}",
                    f"see {self.log_path}",
                )
            with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=1.0) as reply:
                if reply.status == 200:
                    return
            time.sleep(0.05)
        raise ServerError(
            f"tritonserver was not ready within {self.ready_timeout_s:g} s: {self.log_tail(1)}", f"see {self.log_path}"
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        # Indented lines are Triton's usage text (printed when an option is refused); the reason follows it.
        errors = [t for t in text if not t[:1].isspace() and (t.startswith("E") or "error" in t.lower())]
        return " | ".join((errors or text)[-lines:])

    def stop(self, keep_workdir: bool = False) -> None:
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
            # Stubs left behind by a killed server share its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if self._own_workdir and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def embedded(repository: str | Path, models: Sequence[str] = ()) -> Iterator[EmbeddedTriton]:
    server = EmbeddedTriton(repository, models)
    try:
        yield server.start()
    finally:
        server.stop()


@contextlib.contextmanager
def embedded_handle(repository: Path, models: Sequence[str]) -> Iterator[ServerHandle]:
    """The entry point `inferline.embedded_servers: triton` (gRPC address for control, HTTP address
    for inference, metrics address)."""
    with embedded(repository, models) as server:
        pid = server.process.pid if server.process is not None else None
        options = {"metrics_address": server.metrics_address, "http_address": server.http_address}
        yield ServerHandle(server.grpc_address, options, server.startup_s, pid)
