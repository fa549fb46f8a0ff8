"""Run compiled artifacts on remote devices over TVM RPC: ``rpc://host:port`` and
``tracker://host:port/key`` (optionally ``?timeout=SECONDS``, default 60).

TVM's RPC client blocks in C++ without timeouts: a wrong address retries for a minute, a server
that accepts but stays silent, or one that freezes mid-run, hangs forever. So every step here is
bounded: a Python handshake probe with a socket timeout comes first, and each blocking remote call
runs under a watchdog thread that, on timeout, shuts down the session's socket (the blocked C++
call then fails) and raises :class:`DeviceError`. Over RPC the Relax VM is driven with
``set_input`` + ``invoke_stateful`` + ``get_outputs`` (compound results don't cross RPC).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np

from frugalrt.errors import DeviceError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.devices import register_device

RPC_MAGIC, TRACKER_MAGIC = 0xFF271, 0x2F271  # tvm.rpc.base (kept here: probing must not import TVM)
CODE_SUCCESS, CODE_MISMATCH = RPC_MAGIC, RPC_MAGIC + 2
TRACKER_REQUEST, TRACKER_SUMMARY, TRACKER_SUCCESS = 4, 6, 0  # tvm.rpc.base.TrackerCode
DEFAULT_TIMEOUT = 60.0
_START_HINT = "start one with `frugalrt device start rpi4-emu` and check `frugalrt device list`"


@dataclass(frozen=True)
class DeviceAddress:
    """A parsed ``rpc://`` or ``tracker://`` device string."""

    scheme: str
    host: str
    port: int
    key: str = ""
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def parse(cls, device: str) -> "DeviceAddress":
        u = urlsplit(device)
        try:
            port = u.port
        except ValueError:
            port = None
        key = u.path.strip("/")
        if u.scheme not in ("rpc", "tracker") or not u.hostname or port is None or \
                (u.scheme == "tracker") != bool(key):
            raise DeviceError(f"bad device {device!r}: expected rpc://HOST:PORT or "
                              "tracker://HOST:PORT/KEY (optionally ?timeout=SECONDS)")
        query = parse_qs(u.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"timeout"})
        try:
            timeout = float(query.get("timeout", [DEFAULT_TIMEOUT])[0])
        except ValueError:
            timeout = -1.0
        if unknown or not 0 < timeout < float("inf"):
            raise DeviceError(f"bad device {device!r}: " + (f"unknown option {unknown[0]!r}" if unknown else
                              f"timeout must be a positive number of seconds, got {query['timeout'][0]!r}")
                              + " (rpc://HOST:PORT?timeout=SECONDS)")
        return cls(u.scheme, u.hostname, port, key, timeout)


def _exchange(host: str, port: int, payload: bytes, timeout: float, what: str) -> socket.socket:
    """Connect, send ``payload``, return the socket (timeouts and refusals become DeviceError)."""
    sock = None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(timeout)
        sock.sendall(payload)
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        raise DeviceError(f"cannot reach {what} at {host}:{port} ({e.strerror or e}); {_START_HINT}") from None


def _recv(sock: socket.socket, n: int, what: str, host: str, port: int) -> bytes:
    buf = b""
    try:
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("connection closed")
            buf += chunk
    except socket.timeout:
        raise DeviceError(f"{what} at {host}:{port} accepted the connection but did not answer within "
                          f"{sock.gettimeout():.0f} s: it is busy (one session at a time), frozen, or "
                          "not a TVM RPC endpoint") from None
    except OSError as e:
        raise DeviceError(f"{what} at {host}:{port} dropped the connection ({e}); {_START_HINT}") from None
    return buf


def probe(host: str, port: int, timeout: float = 10.0) -> None:
    """Check that a TVM RPC server answers its handshake. A deliberately unmatched key makes the
    server reply "mismatch" without opening (forking) a session, so probing is cheap."""
    key = b"client:frugalrt-probe"
    with _exchange(host, port, struct.pack("<ii", RPC_MAGIC, len(key)) + key, timeout,
                   "RPC server") as sock:
        code = struct.unpack("<i", _recv(sock, 4, "RPC server", host, port))[0]
    if code not in (CODE_SUCCESS, CODE_MISMATCH):
        raise DeviceError(f"{host}:{port} is not a TVM RPC server (handshake code {code:#x})")


def tracker_call(host: str, port: int, message: list, timeout: float) -> Any:
    """One request/response with a TVM RPC tracker (JSON framed by a little-endian length)."""
    with _exchange(host, port, struct.pack("<i", TRACKER_MAGIC), timeout, "RPC tracker") as sock:
        if struct.unpack("<i", _recv(sock, 4, "RPC tracker", host, port))[0] != TRACKER_MAGIC:
            raise DeviceError(f"{host}:{port} is not a TVM RPC tracker")
        data = json.dumps(message).encode()
        sock.sendall(struct.pack("<i", len(data)) + data)
        size = struct.unpack("<i", _recv(sock, 4, "RPC tracker", host, port))[0]
        reply = json.loads(_recv(sock, size, "RPC tracker", host, port))
    if reply[0] != TRACKER_SUCCESS:
        raise DeviceError(f"RPC tracker {host}:{port} refused {message[0]}: {reply}")
    return reply[1]


def tracker_servers(host: str, port: int, key: str, timeout: float = 10.0) -> list:
    """Servers registered with the tracker under ``key``."""
    summary = tracker_call(host, port, [TRACKER_SUMMARY], timeout)
    return [s for s in summary["server_info"] if s["key"] == f"server:{key}"]


def _socket_fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:"):
            out[int(fd)] = link
    return out


def _peer(fd: int) -> tuple | None:
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            return s.getpeername()[:2]
    except OSError:
        return None


class _Channel:
    """The TCP sockets of one TVM RPC session, found by peer address, so a watchdog can cut them."""

    def __init__(self, host: str, port: int):
        self.peer = (socket.gethostbyname(host), port)
        self.before = _socket_fds()
        self.fds: list[int] = []

    def find(self) -> list[int]:
        now = _socket_fds()
        self.fds = [fd for fd, link in now.items()
                    if self.before.get(fd) != link and _peer(fd) == self.peer]
        return self.fds

    def cut(self) -> None:
        for fd in self.fds or self.find():
            try:
                with socket.socket(fileno=os.dup(fd)) as s:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def bounded(fn: Callable[[], Any], timeout: float, channel: _Channel, what: str) -> Any:
    """Run ``fn`` (a blocking TVM RPC call) in a thread; cut the channel if it runs past ``timeout``."""
    box: dict[str, Any] = {}

    def work():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        channel.cut()
        t.join(10.0)
        raise DeviceError(f"{what} did not finish within {timeout:.0f} s; the session was cut "
                          "(raise the limit with ?timeout=SECONDS in the device string)")
    if "error" in box:
        e = box["error"]
        if isinstance(e, DeviceError):
            raise e
        raise DeviceError(f"{what} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
                          f" (the device may have stopped; {_START_HINT})") from e
    return box.get("value")


class RemoteSession:
    """A compiled artifact's Relax VM loaded on a remote device; call it with numpy arrays."""

    def __init__(self, artifact: Artifact, device: str):
        if artifact.kind not in ("shared-lib", "cuda-lib"):
            raise DeviceError(f"{artifact.path}: a {artifact.kind} artifact cannot run over RPC; "
                              "compile for a shared-lib target such as rpi4 (or cuda, jetson-orin)")
        artifact.verify()  # never upload a corrupt or modified library
        self.artifact = artifact
        self.address = addr = DeviceAddress.parse(device)
        self.device_name = device
        host, port, match_key = addr.host, addr.port, ""
        if addr.scheme == "tracker":
            host, port, match_key = self._request(addr)
        probe(host, port, timeout=min(addr.timeout, 10.0))
        self.channel = _Channel(host, port)
        self._closed = False
        self.remote = None
        try:
            self.remote = self._bounded(lambda: self._connect(host, port, match_key), "connecting")
            self.channel.find()
            lib = artifact.lib_path
            self.dev, self.vm = self._bounded(lambda: self._load(lib), f"loading {lib} ({artifact.target})")
        except BaseException:
            self.close()  # the server serves one session at a time: never leave it held
            raise

    @staticmethod
    def _request(addr: DeviceAddress) -> tuple[str, int, str]:
        """Ask the tracker for a free server with the key (bounded: the tracker queues otherwise)."""
        if not tracker_servers(addr.host, addr.port, addr.key, addr.timeout):
            raise DeviceError(f"no device with key {addr.key!r} is registered with tracker "
                              f"{addr.host}:{addr.port}; start one with `frugalrt device start "
                              f"rpi4-emu --tracker {addr.host}:{addr.port} --key {addr.key}`")
        url, port, match_key = tracker_call(addr.host, addr.port,
                                            [TRACKER_REQUEST, addr.key, "", 1], addr.timeout)
        return url, int(port), match_key

    @staticmethod
    def _connect(host: str, port: int, key: str):
        from tvm import rpc

        return rpc.connect(host, port, key=key)

    def _load(self, lib: os.PathLike):
        from tvm.runtime.vm import VirtualMachine

        self.remote.upload(str(lib), target="frugalrt_model.so")
        rlib = self.remote.load_module("frugalrt_model.so")
        dev = self.remote.cuda(0) if self.artifact.kind == "cuda-lib" else self.remote.cpu()  # e.g. a Jetson
        return dev, VirtualMachine(rlib, dev)

    def _bounded(self, fn: Callable[[], Any], what: str) -> Any:
        if self._closed:
            raise DeviceError(f"session on {self.device_name} is closed")
        return bounded(fn, self.address.timeout, self.channel, f"{what} on {self.device_name}")

    def set_inputs(self, *inputs: np.ndarray) -> None:
        """Copy inputs to the device and bind them to ``main`` (for repeated or timed runs)."""
        import tvm

        def run():
            args = [tvm.runtime.tensor(np.ascontiguousarray(x), self.dev) for x in inputs]
            self.vm.set_input("main", *args)

        self._bounded(run, "setting inputs")

    def outputs(self) -> list[np.ndarray]:
        """Run ``main`` once on the bound inputs and fetch its (flattened) outputs."""

        def run():
            self.vm.invoke_stateful("main")
            return [t.numpy() for t in _flatten(self.vm.get_outputs("main"))]

        return self._bounded(run, "running main")

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        self.artifact.check_inputs(inputs)
        self.set_inputs(*inputs)
        return self.outputs()

    def call(self, fn: Callable[[], Any], what: str) -> Any:
        """Run another blocking remote step (e.g. a time evaluator) under the watchdog."""
        return self._bounded(fn, what)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.vm = self.remote = None  # dropping the session closes its socket
            self.channel.cut()

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _flatten(value) -> list:
    if isinstance(value, (tuple, list)) or type(value).__name__ == "Array":
        return [t for v in value for t in _flatten(v)]
    return [value]


def device_info(session: RemoteSession) -> dict:
    """What the server says about itself (servers started by frugalrt answer; others: {})."""
    try:
        fn = session.call(lambda: session.remote.get_function("frugalrt.device_info"), "device info")
    except DeviceError:
        return {}
    return json.loads(session.call(fn, "device info"))


register_device("rpc", RemoteSession)
register_device("tracker", RemoteSession)
