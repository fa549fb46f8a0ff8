"""A fake ARM device for the adb/ssh tests: this machine, with ARM executables run under qemu-user.

Used three ways, always with a JSON config (``serial``, ``root``, ``qemu``, ``delay``):
``fake_device.py adb CONFIG -s SERIAL push|pull|shell|get-state ...`` is the ``adb`` the tests put
on PATH: the device's file system is the folder ``root`` (remote ``/data/...`` maps under it);
``fake_device.py ssh-command CONFIG`` is the forced command of a real sshd's authorized_keys (it
runs ``$SSH_ORIGINAL_COMMAND``); ``fake_device.py ssh CONFIG [options] HOST COMMAND`` stands in for
the ssh client where no sshd can run. A command runs with ``sh -c``; an ARM or AArch64 ELF
executable named in command position runs under ``qemu[cpu]``, which is what binfmt_misc would
do on a machine where it could be registered (that needs root). ``delay`` seconds of sleep before
each shell command simulate a device that hangs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

ELF_MACHINES = {40: "arm", 183: "aarch64"}  # e_machine -> key of the config's qemu commands
_PATH = re.compile(r"'(/[^']+)'|(/[^\s;&|()']+)")


def _elf_machine(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    return ELF_MACHINES.get(int.from_bytes(head[18:20], "little")) if head[:4] == b"\x7fELF" else None


def _mapped(path: str, root: str) -> str:
    return root + path if root and path.startswith("/data/") else path


def shell(command: str, cfg: dict) -> int:
    """Run ``command`` like the device's sh would (ARM executables under qemu); its exit status."""
    time.sleep(cfg.get("delay", 0))
    root = cfg.get("root", "")

    def rewrite(m: re.Match) -> str:
        path = _mapped(m.group(1) or m.group(2), root)
        machine = _elf_machine(path)
        at_command = command[:m.start()].rstrip()[-1:] in ("", ";", "&", "|", "(")
        prefix = " ".join(cfg["qemu"][machine]) + " " if machine and at_command else ""
        return prefix + f"'{path}'"

    return subprocess.run(["sh", "-c", _PATH.sub(rewrite, command)]).returncode


def adb(args: list[str], cfg: dict) -> int:
    if args[:1] != ["-s"] or len(args) < 3:
        print("fake adb: use adb -s SERIAL COMMAND", file=sys.stderr)
        return 1
    serial, command, rest = args[1], args[2], args[3:]
    if serial != cfg["serial"]:
        print(f"error: device '{serial}' not found", file=sys.stderr)
        return 1
    root = cfg["root"]
    if command == "get-state":
        print("device")
        return 0
    if command == "shell":
        return shell(" ".join(rest), cfg)
    if command in ("push", "pull"):
        src, dst = rest
        src, dst = (src, _mapped(dst, root)) if command == "push" else (_mapped(src, root), dst)
        if not os.path.isfile(src):
            print(f"adb: error: failed to stat {'local' if command == 'push' else 'remote'} object "
                  f"'{rest[0]}': No such file or directory", file=sys.stderr)
            return 1
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        shutil.copyfile(src, dst)
        print(f"{rest[0]}: 1 file {command}ed.")
        return 0
    print(f"fake adb: unknown command {command}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    mode, config, rest = argv[0], argv[1], argv[2:]
    with open(config) as f:
        cfg = json.load(f)
    if mode == "adb":
        return adb(rest, cfg)
    if mode == "ssh-command":
        return shell(os.environ.get("SSH_ORIGINAL_COMMAND", ""), cfg)
    return shell(rest[-1], cfg)  # the ssh client stand-in: ssh [options] HOST COMMAND


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
