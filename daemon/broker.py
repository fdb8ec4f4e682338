"""A private mosquitto broker on a free loopback port (the demo, the benchmarks and the tests start one).

Recipe (/work/shared/notes/streaming-recipes.md, "MQTT broker"): Debian's ``mosquitto`` in the foreground
with a config written to a folder (``listener <port> 127.0.0.1``, ``allow_anonymous true``, ``persistence
false``), log to a file in the same folder, stop with SIGTERM. ``start``/``stop`` can be repeated and keep
the port (reconnect tests). Use it as a sync or async context manager::

    with Mosquitto(workdir) as broker:          # or: broker = start_broker(workdir); ...; broker.stop()
        connect to broker.host, broker.port

``free_port`` is the one "pick a free TCP port on loopback" of the project.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str | None:
    """The mosquitto executable (PATH, then Debian's /usr/sbin), or None when it is not installed."""
    exe = shutil.which("mosquitto")
    if exe is None and os.path.exists("/usr/sbin/mosquitto"):
        exe = "/usr/sbin/mosquitto"
    return exe


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def _make_test_certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (EC P-256, valid 1 day), made with openssl."""
    d = workdir / "tls"
    d.mkdir(exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=geometryd-test-ca")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "1", "-extfile", "san.ext")
    return d / "ca.crt", d / "server.crt", d / "server.key"


class BrokerError(RuntimeError):
    """The broker did not start or stop as expected (message carries the log tail)."""


class Mosquitto:
    """One mosquitto process; ``start``/``stop`` can be repeated and keep the same port.

    ``max_packet_size`` (bytes, 0 = broker default) makes the broker drop clients that send larger packets;
    ``users`` (name -> password) turns anonymous access off (``mosquitto_passwd`` file); ``tls`` makes the
    listener TLS-only with a throw-away CA (``ca_file``) and a server certificate for 127.0.0.1;
    ``extra_config`` lines are appended verbatim to the config file.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        max_packet_size: int = 0,
        users: dict[str, str] | None = None,
        tls: bool = False,
        extra_config: list[str] | None = None,
        start_timeout_s: float = 10.0,
        executable: str | None = None,
    ) -> None:
        exe = executable or find_mosquitto()
        if exe is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.executable = exe
        self.host = HOST
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / f"mosquitto-{self.port}.conf"
        self.log_path = self.workdir / f"mosquitto-{self.port}.log"
        self.max_packet_size = max_packet_size
        self.start_timeout_s = start_timeout_s
        self.ca_file: Path | None = None
        lines = [
            f"listener {self.port} {HOST}",
            f"allow_anonymous {'false' if users else 'true'}",
            "persistence false",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if max_packet_size:
            lines.append(f"max_packet_size {max_packet_size}")
        if users or tls:
            lines.append("user root")  # as root, stay root: the files below live in a private folder
        if users:
            password_file = self.workdir / f"passwd-{self.port}"
            password_file.touch(mode=0o600)
            for name, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(password_file), name, password], check=True,
                               capture_output=True)
            lines.append(f"password_file {password_file}")
        if tls:
            self.ca_file, cert, key = _make_test_certificates(self.workdir)
            lines += [f"cafile {self.ca_file}", f"certfile {cert}", f"keyfile {key}"]
        lines += list(extra_config or [])
        self.config_path.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed after Popen
        try:
            self.process = subprocess.Popen(
                [self.executable, "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with {self.process.returncode} on port {self.port}: "
                    f"{self.log()[-2000:]}"
                )
            if _port_open(self.port):
                return
            time.sleep(0.01)
        self.stop()
        raise BrokerError(f"mosquitto not listening on port {self.port} after {self.start_timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Mosquitto:
        # start() blocks for ~10-50 ms only; a thread keeps the event loop responsive anyway.
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


def start_broker(workdir: Path, executable: str | None = None) -> Mosquitto | None:
    """A started anonymous broker on a free port, or None when mosquitto is missing or does not start (the
    caller then falls back, e.g. to the file sink)."""
    try:
        broker = Mosquitto(workdir, executable=executable)
        broker.start()
    except BrokerError:
        return None
    return broker
