"""Run C bundles under QEMU: the ``qemu`` device scheme and deterministic instruction counts.

``qemu:BOARD`` (mps2-an386, mps2-an500, netduinoplus2) runs a c-bundle artifact on an emulated
Cortex-M board (``qemu-system-arm``, I/O over semihosting); plain ``qemu`` runs an armv7 or
rpi-zero artifact's bundle under ``qemu-arm``. The firmware is the bundle plus its test main
(``test/frugalrt_main.c``), built once per bundle and platform into the cache. A fault
(HardFault handler -> exit 99) or a hang ends in a DeviceError within the timeout.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from frugalrt._atomic import atomic_path
from frugalrt._cache import cache_dir
from frugalrt.errors import DeviceError, TargetError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.qemu_plugin import count_in_range, symbol_range
from frugalrt.targets.cbundle import write_inputs
from frugalrt.targets.cbundle.boards import BOARDS, DEFAULT_PLATFORM, Platform, get_platform
from frugalrt.targets.cbundle.memory import check_fits, format_table, measure

TIMEOUT_S = float(os.environ.get("FRUGALRT_QEMU_TIMEOUT", 60))
FAULT_EXIT = 99  # startup_cortexm.c's fault handler


def _artifact(artifact) -> Artifact:
    return artifact if isinstance(artifact, Artifact) else Artifact(artifact)


def bundle_of(artifact: Artifact) -> Path:
    """The artifact's C bundle: its library for c-bundle targets, else ``bundle/`` (armv7 and rpi-zero
    artifacts ship one beside their shared library, since no TVM runtime exists for 32-bit ARM)."""
    if artifact.kind == "c-bundle":
        return artifact.lib_path
    if artifact.target not in DEFAULT_PLATFORM:
        raise DeviceError(f"{artifact.path}: target {artifact.target} does not run under qemu here; "
                          f"emulated targets: {', '.join(DEFAULT_PLATFORM)}")
    if not (artifact.path / "bundle" / "plan.json").is_file():
        raise DeviceError(f"{artifact.path}: no bundle/ to run under qemu; recompile it with "
                          f"`frugalrt compile {artifact.onnx_path} --target {artifact.target} --out ...`")
    return artifact.path / "bundle"


def platform_of(artifact: Artifact, device: str) -> Platform:
    """``qemu`` -> the board the bundle was compiled for (``compile --board``; else the target's own
    platform); ``qemu:BOARD`` -> that board (c-bundle artifacts)."""
    board = device.split(":", 1)[1] if ":" in device else ""
    if not board:
        compiled_for = _plan_board(artifact)
        return get_platform(compiled_for or DEFAULT_PLATFORM.get(artifact.target, "mps2-an386"))
    if artifact.kind != "c-bundle":
        raise DeviceError(f"device {device!r}: boards are for Cortex-M c-bundle artifacts; run this "
                          f"{artifact.target} artifact with device 'qemu'")
    if board not in BOARDS:
        raise DeviceError(f"unknown board {board!r} in device {device!r}; boards: {', '.join(BOARDS)}")
    return get_platform(board)


def _plan_board(artifact: Artifact) -> Optional[str]:
    """The Cortex-M board recorded in a c-bundle artifact's plan.json, if any."""
    if artifact.kind != "c-bundle":
        return None
    try:
        board = json.loads((artifact.lib_path / "plan.json").read_text()).get("board")
    except (OSError, ValueError):
        return None
    return board if board in BOARDS else None


def _digest(bundle: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle)
        if "build" not in rel.parts:  # the bundle's own build outputs, not folders above it
            h.update(str(rel).encode() + path.read_bytes())
    return h.hexdigest()[:16]


def build_firmware(bundle: Path, platform: Platform) -> Path:
    """Build (once, cached by content) the test firmware of ``bundle`` for ``platform``."""
    plan = json.loads((bundle / "plan.json").read_text())
    check_fits(plan, platform)  # a clear refusal with the figures, before the linker's
    missing = [t for t in (platform.cc, platform.qemu[0]) if shutil.which(t) is None]
    if missing:
        raise TargetError(f"{platform.name} needs {', '.join(missing)} (Debian: apt-get install "
                          "gcc-arm-none-eabi libnewlib-arm-none-eabi gcc-arm-linux-gnueabihf qemu-user qemu-system-arm)")
    out = cache_dir() / "firmware" / f"{_digest(bundle)}-{platform.name}"
    elf = out / "app.elf"
    if elf.is_file():
        return elf
    with atomic_path(out, is_dir=True) as tmp:
        proc = subprocess.run(["make", "-s", "-C", str(bundle), f"PLATFORM={platform.name}", f"BUILD={tmp}"],
                              capture_output=True, text=True)
        if proc.returncode:
            raise DeviceError(f"building the {platform.name} firmware of {bundle} failed:\n"
                              f"{(proc.stdout + proc.stderr)[-3000:]}")
    return elf


def run_firmware(elf: Path, platform: Platform, inputs: list[np.ndarray], output_shapes: list[list[int]],
                 timeout: float = TIMEOUT_S) -> list[np.ndarray]:
    """Run ``elf`` on ``inputs`` (batch first) under qemu; the outputs, batch first."""
    with tempfile.TemporaryDirectory(prefix="frugalrt-qemu-") as cwd:
        n = write_inputs(Path(cwd) / "frugalrt_in.bin", inputs)
        cmd = [*platform.qemu, str(elf)]
        try:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{platform.name}: {elf} did not finish within {timeout:.0f} s (hung firmware?); "
                              "raise FRUGALRT_QEMU_TIMEOUT for very large models") from None
        if proc.returncode == FAULT_EXIT:
            raise DeviceError(f"{platform.name}: the firmware faulted (CPU fault handler, exit {FAULT_EXIT}); "
                              f"{(proc.stdout + proc.stderr)[-500:]}")
        if proc.returncode:
            raise DeviceError(f"{platform.name}: `{' '.join(cmd)}` exited with {proc.returncode}: "
                              f"{(proc.stdout + proc.stderr)[-1000:]}")
        flat = np.fromfile(Path(cwd) / "frugalrt_out.bin", dtype=np.float32)
    sizes = [int(np.prod(s)) for s in output_shapes]
    if flat.size != n * sum(sizes):
        raise DeviceError(f"{platform.name}: firmware wrote {flat.size} floats, expected {n * sum(sizes)}")
    rows = flat.reshape(n, -1)
    bounds = np.cumsum([0, *sizes])
    return [rows[:, a:b].reshape(n, *s[1:]).copy() for a, b, s in zip(bounds, bounds[1:], output_shapes)]


class QemuSession:
    """Callable session: ``session(*inputs) -> outputs``, each call one qemu run over the batch."""

    def __init__(self, artifact: Artifact, device: str, timeout: float = TIMEOUT_S):
        self.artifact, self.device, self.timeout = artifact, device, timeout
        self.platform = platform_of(artifact, device)
        self.bundle = bundle_of(artifact)
        self.plan = json.loads((self.bundle / "plan.json").read_text())
        self.elf = build_firmware(self.bundle, self.platform)

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        self.artifact.check_inputs(inputs)
        return run_firmware(self.elf, self.platform, list(inputs), self.plan["outputs"], self.timeout)

    def close(self) -> None:
        pass


def open_qemu(artifact: Artifact, device: str) -> QemuSession:
    return QemuSession(artifact, device)


def _board_session(artifact, board: Optional[str], timeout: float = TIMEOUT_S) -> QemuSession:
    """The firmware of ``artifact`` built for ``board`` (default: its target's own platform)."""
    return QemuSession(_artifact(artifact), f"qemu:{board}" if board else "qemu", timeout)


def count_instructions(artifact, board: Optional[str] = None, timeout: float = TIMEOUT_S) -> dict:
    """Deterministic count of the guest instructions one inference executes (batch 1).

    The firmware runs the first golden input (zeros if none) with ``model_run`` repeated once and
    twice; the difference is exactly one ``model_run``, kernels and libm/libgcc helpers included,
    I/O and startup excluded. Instructions, not cycles: QEMU has no cycle model for these cores.
    """
    session = _board_session(artifact, board, timeout)
    artifact, platform, plan, elf = session.artifact, session.platform, session.plan, session.elf
    golden = artifact.golden()
    inputs = ([g[:1] for g in golden[0]] if golden else
              [np.zeros([1, *s[1:]], np.float32) for s in plan["inputs"]])
    counts = []
    with tempfile.TemporaryDirectory(prefix="frugalrt-count-") as cwd:
        for repeat in (1, 2):
            write_inputs(Path(cwd) / "frugalrt_in.bin", inputs, repeat=repeat)
            counts.append(count_in_range([*platform.qemu, str(elf)], cwd=cwd, timeout=timeout))
    lo, hi = symbol_range(elf, "model_run", nm=platform.nm_tool)
    return {"instructions": counts[1] - counts[0], "unit": "instructions, not cycles",
            "board": platform.name, "target": artifact.target, "model_run_range": [hex(lo), hex(hi)],
            "memory": measure(elf, platform),
            "weights_bytes": plan["weights_bytes"], "arena_bytes": plan["arena_bytes"]}


def memory_report(artifact, board: Optional[str] = None) -> str:
    """The buffer plan and the flash/RAM of the built firmware, as a printable table."""
    session = _board_session(artifact, board)
    plan = dict(session.plan, board=session.platform.name, estimate=check_fits(session.plan, session.platform),
                measured=measure(session.elf, session.platform))
    return format_table(plan)


def _register() -> None:
    from frugalrt.runtime.devices import register_device

    register_device("qemu", open_qemu)


_register()
