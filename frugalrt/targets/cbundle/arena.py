"""Static activation arena: lifetime-planned offsets, so intermediate tensors share memory.

Each intermediate tensor lives from the step that writes it to the last step that reads it
(inclusive, so a kernel's inputs and outputs never overlap). Tensors are placed largest first at
the lowest offset that does not collide with an already placed tensor whose lifetime overlaps
(greedy-by-size, as in TFLite Micro's planner): no malloc, one static array.
"""
from __future__ import annotations

from dataclasses import dataclass

ALIGN = 16


@dataclass(frozen=True)
class Slot:
    name: str
    offset: int
    nbytes: int
    first: int  # step that writes it
    last: int  # last step that reads it


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_arena(sizes: dict[str, int], lifetimes: dict[str, tuple[int, int]]) -> tuple[list[Slot], int]:
    """Offsets for tensors ``sizes[name]`` live over ``lifetimes[name]``; returns (slots, arena bytes)."""
    placed: list[Slot] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], lifetimes[n][0], n)):
        first, last = lifetimes[name]
        size = _align(sizes[name])
        offset = 0
        for other in sorted((s for s in placed if s.first <= last and first <= s.last), key=lambda s: s.offset):
            if offset + size <= other.offset:
                break
            offset = max(offset, other.offset + _align(other.nbytes))
        placed.append(Slot(name, offset, sizes[name], first, last))
    arena = max((s.offset + _align(s.nbytes) for s in placed), default=0)
    return sorted(placed, key=lambda s: (s.first, s.offset)), arena


def lifetimes_of(steps, is_planned) -> dict[str, tuple[int, int]]:
    """[first write, last read] step of each tensor for which ``is_planned(name)`` holds."""
    spans: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        for name in step.args:
            if is_planned(name):
                spans.setdefault(name, [i, i])[1] = i
    return {name: (a, b) for name, (a, b) in spans.items()}
