"""Deterministic instruction counts of one inference on the emulated aarch64 device.

qemu wall time is not a valid relative speed measure (NEON is emulated in software); the number
of guest instructions executed is, as a proxy. Counting the whole device Python is useless here:
interpreter start-up varies by millions of instructions run to run, more than a small model costs.
So the count is restricted to the model library's code (``lib.so``, where TVM's kernels live): a
first run reports where qemu maps it (deterministic, and checked again by the counting runs), then
the device Python runs the model through the VM's C++ time evaluator ``1`` and ``1 + n`` times
with the counting plugin (``frugalrt.runtime.qemu_plugin``); the difference divided by ``n`` is one
inference. Excluded: the Relax VM's dispatch and any libm/TVM runtime helpers the kernels call.
One thread (``TVM_NUM_THREADS=1``): the plugin's inline counter is not atomic across guest
threads, and a single-thread count is the total work anyway.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from frugalrt.errors import DeviceError
from frugalrt.runtime.emulator.userland import ensure_userland

_SERVE = str(Path(__file__).with_name("serve.py"))


def count_instructions(lib_path: str | Path, inputs: list[np.ndarray], runs: int = 10,
                       timeout: float = 300.0) -> dict:
    """Guest instructions per inference executed in the kernels of ``lib_path`` on ``inputs``."""
    from frugalrt.runtime.qemu_plugin import count_in_range

    userland = ensure_userland()
    with tempfile.TemporaryDirectory(prefix="frugalrt-count-") as tmp:
        npz = Path(tmp) / "inputs.npz"
        np.savez(npz, **{f"input_{i}": np.ascontiguousarray(x) for i, x in enumerate(inputs)})

        def command(number: int, expect: str = "") -> list[str]:
            return userland.command(_SERVE, "count", "--lib", str(Path(lib_path).resolve()), "--inputs", str(npz),
                                    "--number", str(number), "--expect-code", expect,
                                    env={"TVM_NUM_THREADS": "1"})

        try:
            out = subprocess.run(command(0), capture_output=True, text=True, timeout=timeout).stdout
        except subprocess.TimeoutExpired:
            raise DeviceError(f"loading {lib_path} under qemu-aarch64 took over {timeout:.0f} s") from None
        m = re.search(r"FRUGALRT_CODE (0x[0-9a-f]+) (0x[0-9a-f]+)", out)
        if not m or m.group(1) == "0x0":
            raise DeviceError(f"could not locate {lib_path}'s code under qemu-aarch64:\n{out[-1500:]}")
        lo, hi = int(m.group(1), 16), int(m.group(2), 16)

        def count(number: int) -> int:
            return count_in_range(command(number, f"{lo:#x}-{hi:#x}"), lo, hi, cwd=tmp, timeout=timeout)

        with ThreadPoolExecutor(2) as pool:
            base, full = pool.map(count, (1, 1 + runs))
    per_run, rest = divmod(full - base, runs)
    return {"instructions": per_run, "unit": "instructions, not cycles",
            "device": "qemu-aarch64 -cpu cortex-a72 (user mode)", "batch": int(inputs[0].shape[0]),
            "exact": rest == 0, "scope": "model kernels (lib.so code); VM dispatch and libm excluded",
            "method": f"(count with {1 + runs} runs - count with 1 run) / {runs}"}
