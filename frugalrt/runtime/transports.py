"""Shells on devices without a TVM runtime: ``adb://SERIAL`` and ``ssh://[user@]host[:port]``.

A :class:`Transport` pushes a file, runs a shell command and pulls a file, each step bounded by
the device's timeout (``?timeout=SECONDS``, default 60): a step that runs over kills the local
``adb`` or ``ssh`` client and raises :class:`DeviceError` naming the step. Both only need what
every device has: ``adb`` uses ``push``/``shell``/``pull`` (old adb servers do not return the
remote exit status, so the command echoes it); ``ssh`` never prompts (BatchMode) and copies files
with ``cat`` over the connection, so neither scp nor sftp is needed on the device (Dropbear and
BusyBox suffice). Extra ssh options (``-i KEY``, ``-F CONFIG``) come from ``$FRUGALRT_SSH_OPTIONS``.

Device options, after ``?``: ``timeout`` (seconds per step), ``dir`` (where the temporary
working directory goes: ``/data/local/tmp`` on adb, ``/tmp`` on ssh), ``runner`` (the artifact's
runner file, e.g. ``runner-noneon``), ``emulated=1`` (label wall times "not representative";
``adb://emulator-*`` serials are emulators anyway).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from frugalrt.errors import DeviceError

DEFAULT_TIMEOUT = 60.0
_RC_MARK = re.compile(r"frugalrt-rc=(\d+)\n?")  # the remote status, echoed after the command
OPTIONS = ("timeout", "dir", "runner", "emulated")
TOOL_HINTS = {"adb": "Android platform-tools (Debian: apt-get install adb)",
              "ssh": "an OpenSSH client (Debian: apt-get install openssh-client)"}


@dataclass(frozen=True)
class DeviceUrl:
    """A parsed ``adb://SERIAL`` or ``ssh://[user@]host[:port]`` device, with its options."""

    url: str
    scheme: str
    target: str  # the adb serial, or ssh's [user@]host
    port: int | None
    timeout: float
    workdir: str
    runner: str
    emulated: bool

    @classmethod
    def parse(cls, device: str) -> "DeviceUrl":
        usage = "adb://SERIAL or ssh://[USER@]HOST[:PORT], optionally ?timeout=SECONDS&dir=PATH&runner=FILE&emulated=1"
        scheme, _, rest = device.partition("://")
        location, _, query_text = rest.partition("?")
        query = parse_qs(query_text, keep_blank_values=True)
        unknown = sorted(set(query) - set(OPTIONS))
        if scheme not in ("adb", "ssh") or not location or any(c.isspace() for c in location) or unknown:
            why = f"unknown option {unknown[0]!r}" if unknown else "expected " + usage
            raise DeviceError(f"bad device {device!r}: {why}")
        option = lambda key, default: query.get(key, [default])[0]  # noqa: E731
        try:
            timeout = float(option("timeout", DEFAULT_TIMEOUT))
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < float("inf"):
            raise DeviceError(f"bad device {device!r}: timeout must be a positive number of seconds")
        port = None
        if scheme == "ssh":
            parts = urlsplit(f"ssh://{location}")
            try:
                port = parts.port
            except ValueError:
                raise DeviceError(f"bad device {device!r}: the port must be a number (1-65535)") from None
            if not parts.hostname or parts.path:
                raise DeviceError(f"bad device {device!r}: expected {usage}")
            location = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
        elif "/" in location:
            raise DeviceError(f"bad device {device!r}: an adb serial has no '/' (see `adb devices`)")
        workdir = option("dir", "/data/local/tmp" if scheme == "adb" else "/tmp")
        emulated = option("emulated", "0") not in ("0", "") or (scheme == "adb" and location.startswith("emulator-"))
        return cls(device, scheme, location, port, timeout, workdir, option("runner", "runner"), emulated)


class Transport:
    """push / shell / pull on one device, each bounded by ``address.timeout`` (or the ``timeout`` given)."""

    tool = ""

    def __init__(self, address: DeviceUrl):
        self.address = address
        if shutil.which(self.tool) is None:
            raise DeviceError(f"device {address.url}: the {self.tool} tool is not on PATH; install "
                              f"{TOOL_HINTS[self.tool]}")

    def _run(self, argv: list[str], step: str, timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
        limit = timeout or self.address.timeout
        try:
            return subprocess.run(argv, timeout=limit, **kwargs)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"device {self.address.url}: {step} timed out after {limit:g} s "
                              "(raise it with ?timeout=SECONDS)") from None
        except OSError as e:
            raise DeviceError(f"device {self.address.url}: cannot run {argv[0]}: {e.strerror or e}") from None

    def _failed(self, step: str, output: str, rc: int | None = None) -> DeviceError:
        tail = " ".join(output.strip().splitlines()[-3:])[-500:] or "no output"
        status = f" (exit status {rc})" if rc is not None else ""
        return DeviceError(f"device {self.address.url}: {step} failed{status}: {tail}")

    def shell(self, command: str, timeout: float | None = None) -> tuple[int, str]:
        """Run ``command`` with the device's sh; (exit status, stdout and stderr together)."""
        raise NotImplementedError

    def check(self, command: str, step: str, timeout: float | None = None) -> str:
        """``shell`` that raises DeviceError (with the output's tail) unless the command exits 0."""
        rc, output = self.shell(command, timeout)
        if rc:
            raise self._failed(step, output, rc)
        return output

    def push(self, local: str, remote: str) -> None:
        raise NotImplementedError

    def pull(self, remote: str, local: str) -> None:
        raise NotImplementedError


class AdbTransport(Transport):
    tool = "adb"

    def __init__(self, address: DeviceUrl):
        super().__init__(address)
        self.adb = ["adb", "-s", address.target]
        state = self._run([*self.adb, "get-state"], "adb get-state", capture_output=True, text=True)
        if state.returncode or state.stdout.strip() != "device":
            raise DeviceError(f"device {address.url}: adb does not see a ready device {address.target!r} "
                              f"({(state.stderr or state.stdout).strip() or 'no answer'}); check `adb devices`")

    def shell(self, command: str, timeout: float | None = None) -> tuple[int, str]:
        proc = self._run([*self.adb, "shell", f"({command}) 2>&1; echo frugalrt-rc=$?"], "adb shell", timeout,
                         capture_output=True, text=True, errors="replace")
        text = (proc.stdout + proc.stderr).replace("\r\n", "\n")  # old adb shells run in a pty: CRLF
        marks = list(_RC_MARK.finditer(text))
        if not marks:
            raise self._failed("adb shell", text, proc.returncode)
        last = marks[-1]
        return int(last.group(1)), text[:last.start()] + text[last.end():]

    def push(self, local: str, remote: str) -> None:
        proc = self._run([*self.adb, "push", local, remote], f"adb push {os.path.basename(local)}",
                         capture_output=True, text=True)
        if proc.returncode:
            raise self._failed(f"adb push {local} {remote}", proc.stdout + proc.stderr, proc.returncode)

    def pull(self, remote: str, local: str) -> None:
        proc = self._run([*self.adb, "pull", remote, local], f"adb pull {remote}", capture_output=True, text=True)
        if proc.returncode:
            raise self._failed(f"adb pull {remote}", proc.stdout + proc.stderr, proc.returncode)


class SshTransport(Transport):
    tool = "ssh"

    def __init__(self, address: DeviceUrl):
        super().__init__(address)
        port = ["-p", str(address.port)] if address.port else []
        connect = max(1, int(min(address.timeout, 30)))
        self.ssh = ["ssh", "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect}", *port,
                    *shlex.split(os.environ.get("FRUGALRT_SSH_OPTIONS", "")), address.target]

    def _ssh(self, command: str, step: str, timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
        proc = self._run([*self.ssh, command], step, timeout, **kwargs)
        if proc.returncode == 255:  # ssh's own failure: connection, authentication, host key
            err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
            raise self._failed(f"ssh to {self.address.target}", err)
        return proc

    def shell(self, command: str, timeout: float | None = None) -> tuple[int, str]:
        proc = self._ssh(command, "ssh command", timeout, capture_output=True, text=True, errors="replace")
        return proc.returncode, proc.stdout + proc.stderr

    def push(self, local: str, remote: str) -> None:
        with open(local, "rb") as data:
            proc = self._ssh(f"cat > {shlex.quote(remote)}", f"push {os.path.basename(local)}", stdin=data,
                             capture_output=True)
        if proc.returncode:
            raise self._failed(f"push {local} to {remote}", proc.stderr.decode(errors="replace"), proc.returncode)

    def pull(self, remote: str, local: str) -> None:
        with open(local, "wb") as out:
            proc = self._ssh(f"cat {shlex.quote(remote)}", f"pull {remote}", stdout=out, stderr=subprocess.PIPE)
        if proc.returncode:
            raise self._failed(f"pull {remote}", proc.stderr.decode(errors="replace"), proc.returncode)


TRANSPORTS: dict[str, Callable[[DeviceUrl], Transport]] = {"adb": AdbTransport, "ssh": SshTransport}


def open_transport(address: DeviceUrl) -> Transport:
    return TRANSPORTS[address.scheme](address)
