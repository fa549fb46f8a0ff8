"""Emulated devices: TVM RPC servers on 127.0.0.1 that run aarch64 code under qemu-aarch64.

``start_device("rpi4-emu")`` sets up (once, cached) an aarch64 Python + TVM runtime userland and
starts an RPC server under qemu in its own process group; ``stop_devices`` ends exactly the groups
started here; ``start_tracker`` runs a TVM RPC tracker on the host so several devices can be
requested by key (``tracker://host:port/key``). The ``host`` kind is a native RPC server (x86
artifacts; cheap in tests).

Ports: without an explicit port a server binds port 0 itself and reports the port the kernel gave it
(``FRUGALRT_READY <port>`` on its log), so there is no window in which another process can take a
port chosen beforehand. Names: a name given explicitly is unique (a second start while the first
runs is a DeviceError); a default name (the kind, ``tracker``) is numbered when taken.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from frugalrt.errors import DeviceError
from frugalrt.runtime.emulator.processes import ServerRecord, check_name_free, records, spawn, stop
from frugalrt.runtime.emulator.userland import Userland, ensure_userland

HOST = "127.0.0.1"
_SERVE = str(Path(__file__).with_name("serve.py"))


def _emulated_aarch64(log) -> list[str]:
    return ensure_userland(log).command(_SERVE)


def _native(log) -> list[str]:
    return [sys.executable, _SERVE]


# kind -> (description, how to run serve.py there)
DEVICE_KINDS: dict[str, tuple[str, Callable]] = {
    "rpi4-emu": ("Raspberry Pi 4 (aarch64) emulated by qemu-aarch64; runs rpi4 artifacts", _emulated_aarch64),
    "host": ("native RPC server on this machine; runs host artifacts", _native),
}


def _port_args(port: int | None) -> list[str]:
    """serve.py's port options: an explicit port alone, else none (the server binds port 0)."""
    return ["--port", str(port), "--port-end", str(port + 1)] if port else []


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def start_device(kind: str = "rpi4-emu", port: int | None = None, name: str | None = None,
                 tracker: str | None = None, key: str | None = None, log=_log) -> ServerRecord:
    """Start an RPC server of ``kind`` and return its record once it answers on ``rpc://HOST:PORT``.

    ``port``: None (or 0) for any free port (bound by the server itself). ``name``: None for the kind,
    numbered if taken (``rpi4-emu-2``); an explicit name already running is a DeviceError."""
    from frugalrt.runtime.remote import probe

    if kind not in DEVICE_KINDS:
        raise DeviceError(f"unknown device kind {kind!r}; known: {', '.join(DEVICE_KINDS)}")
    if name is not None:
        check_name_free(name)  # early, before a userland set-up; spawn checks again under its lock
    tracker = tracker.removeprefix("tracker://") if tracker else None
    base = DEVICE_KINDS[kind][1](log)
    argv = base + ["server", "--kind", kind, "--host", HOST] + _port_args(port)
    if tracker:
        argv += ["--tracker", tracker, "--key", key or kind]
    log(f"starting {kind} device {name or '(default name)'} on {HOST}:{port or '(a free port)'}")
    rec = spawn(name or kind, kind, argv, HOST, {"tracker": tracker, "key": key or kind} if tracker else {},
                numbered=name is None)
    host, _, p = rec.address.rpartition(":")
    try:
        probe(host, int(p), timeout=30.0)
    except BaseException:  # also Ctrl-C: never leave the qemu process group running
        stop(rec)
        raise
    rec.address = f"rpc://{rec.address}"
    rec.save()
    return rec


def start_tracker(port: int | None = None, name: str | None = None, log=_log) -> ServerRecord:
    """Start a TVM RPC tracker on the host; servers register with ``--tracker HOST:PORT``.
    ``port`` and ``name`` as in ``start_device`` (default name ``tracker``, numbered if taken)."""
    argv = [sys.executable, _SERVE, "tracker", "--host", HOST] + _port_args(port)
    log(f"starting RPC tracker on {HOST}:{port or '(a free port)'}")
    rec = spawn(name or "tracker", "tracker", argv, HOST, {}, numbered=name is None)
    rec.address = f"tracker://{rec.address}"
    rec.save()
    return rec


def list_devices() -> list[ServerRecord]:
    """Running servers and trackers started by frugalrt (stale records are dropped)."""
    return records()


def stop_devices(names: list[str] | None = None) -> list[str]:
    """Stop the named servers (all if ``names`` is None); return the names stopped."""
    running = {r.name: r for r in records()}
    unknown = sorted(set(names or ()) - set(running))
    if unknown:
        raise DeviceError(f"no running device named {', '.join(unknown)}; running: "
                          f"{', '.join(running) or 'none'} (see `frugalrt device list`)")
    chosen = [running[n] for n in (names if names is not None else running)]
    for rec in chosen:
        stop(rec)
    return [r.name for r in chosen]


__all__ = ["DEVICE_KINDS", "ServerRecord", "Userland", "ensure_userland", "list_devices",
           "start_device", "start_tracker", "stop_devices"]
