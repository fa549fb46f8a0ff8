"""Deterministic instruction counts under QEMU: a TCG plugin counting executed guest instructions.

qemu wall time does not preserve speed ratios (NEON and VFP are emulated in software), but the
number of guest instructions executed is exact and identical run to run in system mode. The plugin
(``qemu_insn_count.c``, plugin API v1, no QEMU headers needed) is built once with the host gcc
into the cache. The counts are *instructions, not cycles*: no cycle model exists for these cores.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from frugalrt._atomic import atomic_path
from frugalrt._cache import cache_dir
from frugalrt.errors import DeviceError

PLUGIN_SOURCE = Path(__file__).with_name("qemu_insn_count.c")


def build_plugin(cc: str = "gcc") -> Path:
    """Compile the counting plugin once (keyed by its source) and return the cached ``.so``."""
    source = PLUGIN_SOURCE.read_bytes()
    path = cache_dir() / "qemu-plugin" / f"insn_count-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if path.exists():
        return path
    if shutil.which(cc) is None:
        raise DeviceError(f"cannot build the qemu instruction-count plugin: host compiler {cc!r} "
                          "not found (apt-get install gcc)")
    with atomic_path(path) as tmp:
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(PLUGIN_SOURCE)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise DeviceError(f"building {PLUGIN_SOURCE.name} failed:\n{proc.stderr}")
    return path


def symbol_range(elf: str | os.PathLike, symbol: str, nm: str = "arm-none-eabi-nm") -> tuple[int, int]:
    """[start, end) of ``symbol`` in ``elf`` from ``nm -S`` (Thumb bit cleared)."""
    out = subprocess.run([nm, "-S", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3] == symbol:
            start = int(parts[0], 16) & ~1
            return start, start + int(parts[1], 16)
    raise DeviceError(f"symbol {symbol!r} not found (with a size) in {elf}")


def count_in_range(qemu_cmd: Sequence[str], lo: Optional[int] = None, hi: Optional[int] = None, *,
                   cwd: Optional[str | os.PathLike] = None, timeout: float = 120.0) -> int:
    """Run ``qemu_cmd`` (``qemu-system-arm ...`` or ``qemu-arm ...``) with the plugin loaded and
    return the number of instructions executed at addresses in [lo, hi) (default: all)."""
    plugin = build_plugin()
    with tempfile.TemporaryDirectory(prefix="frugalrt-count-") as tmp:
        out = Path(tmp) / "count.txt"
        args = [str(plugin), f"out={out}"]
        if lo is not None:
            args.append(f"lo={lo:#x}")
        if hi is not None:
            args.append(f"hi={hi:#x}")
        cmd = [qemu_cmd[0], "-plugin", ",".join(args), *qemu_cmd[1:]]
        try:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{qemu_cmd[0]} did not finish within {timeout:.0f} s while counting "
                              "instructions") from None
        if proc.returncode or not out.exists():
            raise DeviceError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                              f"{(proc.stdout + proc.stderr)[-2000:]}")
        return int(out.read_text())
