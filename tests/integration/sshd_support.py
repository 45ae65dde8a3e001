"""A real OpenSSH server for the SSH executor's tests: started on a free loopback port
as the current user, with a generated host key and client key and a config of its own
(no PAM, authorized keys in the temp dir), and stopped at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import _missing

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "conveyor-test", "-f", str(path)],
        check=True,
        timeout=30,
    )


@dataclass
class Sshd:
    dir: Path
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cfg = self.dir / "sshd_config"
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "sshd.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def session_pids(self) -> list[int]:
        """The sshd processes serving connections: the listener's sshd descendants (a
        session has a privileged monitor and an unprivileged child holding the socket),
        not the commands they run."""
        assert self.proc is not None
        found: list[int] = []
        todo = [self.proc.pid]
        while todo:
            out = subprocess.run(
                ["pgrep", "-P", str(todo.pop())], capture_output=True, text=True, timeout=10
            ).stdout
            for pid in map(int, out.split()):
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    continue
                if comm.startswith("sshd"):
                    found.append(pid)
                    todo.append(pid)
        return found

    def drop_sessions(self) -> int:
        pids = self.session_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def host_toml(self, name: str = "lab", **extra: object) -> str:
        values: dict[str, object] = {
            "address": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "key_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "connect_timeout": 5,
        }
        values.update(extra)
        lines = [f"[hosts.{name}]"]
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


@pytest.fixture(name="sshd")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        _missing("OpenSSH server not installed (/usr/sbin/sshd; .ci/run installs it)")
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        # sshd running as root wants its privilege-separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    _keygen(d / "host_ed25519")
    _keygen(d / "client_ed25519")
    shutil.copy(d / "client_ed25519.pub", d / "authorized_keys")
    port = _free_port()
    host_pub = (d / "host_ed25519.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (d / "sshd_config").write_text(
        f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d / "host_ed25519"}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {d / "authorized_keys"}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowUsers {user}
MaxStartups 50
MaxSessions 50
LogLevel VERBOSE
"""
    )
    server = Sshd(d, port, user, d / "client_ed25519", d / "known_hosts")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class CuttableLink:
    """A TCP relay on a loopback port in front of `port`, whose `cut` stops every byte
    both ways while leaving each connection open: a network cut, which neither end is
    told of (no FIN, no RST)."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                near.close()
                continue
            self._sockets += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                self._open.wait()  # once cut, what came is held, and nothing more read
                if self._closed or not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        if not self._closed:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self._open.clear()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv; sends FIN
            with contextlib.suppress(OSError):
                sock.close()
