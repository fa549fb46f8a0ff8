"""Background servers that outlive the command that started them, and stop exactly.

Each server runs in its own session/process group (TVM's RPC server forks one child per connection;
under qemu-user each is a qemu process too), so stopping ends the whole group. A JSON record per
server keeps its pid and the kernel's start time of that pid: a recycled pid is never signalled.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from frugalrt._atomic import atomic_path
from frugalrt._cache import cache_dir
from frugalrt.errors import DeviceError

_READY = re.compile(rb"FRUGALRT_READY (\d+)")


def state_dir() -> Path:
    """Where records of running servers live (``FRUGALRT_STATE_DIR`` overrides, e.g. in tests)."""
    d = Path(os.environ.get("FRUGALRT_STATE_DIR") or cache_dir() / "devices")
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class ServerRecord:
    """A started server: ``address`` is ``rpc://host:port`` (servers) or ``tracker://host:port`` (trackers)."""

    name: str
    kind: str
    pid: int
    start_time: int
    address: str
    log: str
    options: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return state_dir() / f"{self.name}.json"

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1))

    def owns_group(self) -> bool:
        """True if the group is still ours: a live pid's start time matches, or the leader is gone
        (the kernel reuses no pid that still names a process group with members)."""
        return _start_time(self.pid) in (self.start_time, None)

    def alive(self) -> bool:
        return self.owns_group() and bool(group_members(self.pid))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def _start_time(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[19]) if f else None  # field 22: starttime, clock ticks after boot


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f and f[0] != "Z" and int(f[2]) == pgid:
                pids.append(int(entry))
    return pids


def records() -> list[ServerRecord]:
    """Records of running servers; stale ones (process gone or pid reused) are removed."""
    out = []
    for p in sorted(state_dir().glob("*.json")):
        try:
            rec = ServerRecord(**json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # being written, or not ours
        if rec.alive():
            out.append(rec)
        else:
            p.unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def _names_locked():
    """Held while a name is chosen and its record first saved: two starts never take one name."""
    with open(state_dir() / ".names.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def free_name(base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... if a running server (or a fresh record) has it."""
    taken = {r.name for r in records()} | {p.stem for p in state_dir().glob("*.json")}
    if base not in taken:
        return base
    return next(f"{base}-{i}" for i in range(2, 10_000) if f"{base}-{i}" not in taken)


def check_name_free(name: str) -> None:
    """DeviceError (one line: which device, how to stop it) if a running server is called ``name``."""
    rec = next((r for r in records() if r.name == name), None)
    if rec is not None:
        where = f" at {rec.address}" if rec.address else " (still starting)"
        raise DeviceError(f"a device named {name!r} is already running ({rec.kind}{where}); stop it with "
                          f"`frugalrt device stop {name}` or choose another --name")


def spawn(name: str, kind: str, argv: list[str], host: str, options: dict,
          timeout: float = 60.0, numbered: bool = False) -> ServerRecord:
    """Start ``argv`` (a ``serve.py`` command) in a new session; wait for its ready line
    (``FRUGALRT_READY <port>``: the server reports the port it bound).

    ``name`` must be free (else DeviceError); with ``numbered`` a taken name becomes ``name-2``, ...
    The name is claimed atomically: its record is saved, under a lock, before the server is ready."""
    with _names_locked():
        if numbered:
            name = free_name(name)
        else:
            check_name_free(name)
        log = state_dir() / f"{name}-{time.time_ns()}.log"  # unique: a stale stop must not delete it
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        rec = ServerRecord(name, kind, proc.pid, _start_time(proc.pid) or 0, "", str(log), options)
        try:
            rec.save()  # saved before it is ready, so `device stop --all` finds a server stuck starting
        except BaseException:
            stop(rec)
            raise
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _READY.search(log.read_bytes())
            if m:
                rec.address = f"{host}:{int(m.group(1))}"
                rec.save()
                return rec
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    except BaseException:
        stop(rec)
        raise
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    why = f"exited with code {proc.returncode}" if proc.poll() is not None else \
        f"did not report ready within {timeout:.0f} s"
    stop(rec)
    raise DeviceError(f"{kind} server {name!r} {why}: {lines[-1] if lines else 'no output'}")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # only succeeds if we are its parent (tests, same process)
    except ChildProcessError:
        pass


def _wait_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        _reap(pgid)
        if not group_members(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def stop(rec: ServerRecord, grace: float = 5.0) -> None:
    """End the server's whole process group (TERM, then KILL after ``grace`` s); drop its record."""
    if rec.owns_group():
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(rec.pid, sig)
            except ProcessLookupError:
                break
            if _wait_gone(rec.pid, wait):
                break
    try:  # the name may already belong to a newer server: drop the record only if it is this one
        if json.loads(rec.path.read_text()).get("pid") == rec.pid:
            rec.path.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass
    Path(rec.log).unlink(missing_ok=True)
