"""Flash and RAM of a bundle: an estimate before building (to refuse what cannot fit) and the
figures of the linked firmware (``arm-none-eabi-size``) after."""
from __future__ import annotations

import subprocess
from pathlib import Path

from frugalrt.errors import TargetError
from frugalrt.targets.cbundle.boards import KB, PLATFORMS, Platform

# Upper bounds for the code of a bundle's firmware, calibrated on arm-none-eabi-gcc -O2 builds:
# newlib (stdio over semihosting, libm) plus the runtime shim, and each TVM kernel.
CODE_BASE_BYTES = 40 * KB
CODE_PER_KERNEL_BYTES = 4 * KB


def estimate(plan: dict, platform: Platform) -> dict:
    """Flash = weights + code bound; RAM = arena + workspace + test I/O buffers + heap + stack."""
    flash = plan["weights_bytes"] + CODE_BASE_BYTES + CODE_PER_KERNEL_BYTES * plan["num_kernels"]
    ram = (plan["arena_bytes"] + plan["workspace_bytes"] + plan["io_bytes"]
           + platform.heap_bytes + platform.stack_bytes)
    return {"flash_bytes": flash, "ram_bytes": ram}


def check_fits(plan: dict, platform: Platform) -> dict:
    """Refuse, before building, a model that cannot fit ``platform``'s flash or RAM."""
    est = estimate(plan, platform)
    if not platform.bare_metal:
        return est
    flash_cap, ram_cap = platform.flash[1], platform.ram[1]
    if est["flash_bytes"] > flash_cap or est["ram_bytes"] > ram_cap:
        raise TargetError(
            f"model does not fit {platform.name} ({flash_cap // KB} KB flash, {ram_cap // KB} KB RAM): needs "
            f"~{est['flash_bytes'] / KB:.0f} KB flash (weights {plan['weights_bytes'] / KB:.1f} KB + code bound "
            f"{(est['flash_bytes'] - plan['weights_bytes']) / KB:.0f} KB) and ~{est['ram_bytes'] / KB:.0f} KB RAM "
            f"(arena {plan['arena_bytes'] / KB:.1f} KB + workspace {plan['workspace_bytes'] / KB:.1f} KB + "
            f"I/O {plan['io_bytes'] / KB:.1f} KB + heap/stack {(platform.heap_bytes + platform.stack_bytes) / KB:.0f}"
            f" KB). Use binary/butterfly layers or fewer features{_bigger_board_hint(est, platform)}")
    return est


def boards_that_fit(est: dict, platform: Platform) -> list[Platform]:
    """The other boards whose flash and RAM hold ``est`` (necessarily bigger than ``platform`` where it
    failed), same CPU first, then smallest first."""
    fits = [p for p in PLATFORMS.values() if p.bare_metal and p.name != platform.name
            and p.flash[1] >= est["flash_bytes"] and p.ram[1] >= est["ram_bytes"]]
    return sorted(fits, key=lambda p: (p.cflags != platform.cflags, p.flash[1] + p.ram[1]))


def _bigger_board_hint(est: dict, platform: Platform) -> str:
    fits = boards_that_fit(est, platform)
    if fits:
        best = fits[0]
        return (f", or a bigger board: {best.name} ({best.flash[1] // KB} KB flash, {best.ram[1] // KB} KB RAM, "
                f"--board {best.name})")
    largest = max((p for p in PLATFORMS.values() if p.bare_metal), key=lambda p: p.flash[1] + p.ram[1])
    if platform.flash[1] + platform.ram[1] >= largest.flash[1] + largest.ram[1]:
        return f"; no board here is bigger than {platform.name}"
    return f"; no board here is big enough (the largest, {largest.name}, has {largest.flash[1] // KB} KB flash, " \
           f"{largest.ram[1] // KB} KB RAM)"


def measure(elf: str | Path, platform: Platform) -> dict:
    """Flash (text + data) and static RAM (data + bss) of a linked firmware, from ``size``."""
    out = subprocess.run([platform.size_tool, str(elf)], capture_output=True, text=True, check=True).stdout
    text, data, bss = (int(v) for v in out.splitlines()[1].split()[:3])
    return {"text": text, "data": data, "bss": bss, "flash_bytes": text + data, "ram_bytes": data + bss,
            "ram_with_heap_stack_bytes": data + bss + platform.heap_bytes + platform.stack_bytes}


def format_table(plan: dict) -> str:
    """The buffer plan and memory figures as a printable table."""
    rows = [f"{'tensor':<8} {'bytes':>9} {'offset':>9} {'steps':>9}  role"]
    for t in plan["buffers"]:
        steps = f"{t['first']}-{t['last']}" if "first" in t else ""
        rows.append(f"{t['name']:<8} {t['nbytes']:>9} {t.get('offset', ''):>9} {steps:>9}  {t['kind']}")
    rows.append(f"weights {plan['weights_bytes']} B in flash ({plan['binary_weights_bytes']} B bit-packed), "
                f"peak arena {plan['arena_bytes']} B (vs {plan['unplanned_bytes']} B without reuse), "
                f"workspace {plan['workspace_bytes']} B, {plan['num_kernels']} kernels")
    for key in ("estimate", "measured"):
        if key in plan:
            fig = plan[key]
            static = (f" static + {fig['ram_with_heap_stack_bytes'] - fig['ram_bytes']} B heap/stack"
                      if "ram_with_heap_stack_bytes" in fig else " (incl. heap/stack)")
            rows.append(f"{key}: flash {fig['flash_bytes']} B, RAM {fig['ram_bytes']} B{static}"
                        + (f" [{plan['board']}]" if plan.get("board") else ""))
    return "\n".join(rows)
