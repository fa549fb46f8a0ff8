"""The QEMU instruction-count plugin: exact, deterministic and restricted to an address range."""
from __future__ import annotations

import subprocess

import pytest

from frugalrt.runtime.qemu_plugin import build_plugin, count_in_range, symbol_range

PROGRAM = r"""
#include <stdlib.h>
__attribute__((noinline)) int spin(int n) { volatile int s = 0; for (int i = 0; i < n; i++) s += i; return s; }
int main(int argc, char **argv) { return spin(atoi(argv[1])) == -1; }
"""


@pytest.fixture(scope="module")
def spin_elf(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin")
    (path / "spin.c").write_text(PROGRAM)
    subprocess.run(["arm-linux-gnueabihf-gcc", "-O2", "-static", "-o", str(path / "spin"), str(path / "spin.c")],
                   check=True)
    return path / "spin"


@pytest.mark.emulated
def test_plugin_builds_once():
    assert build_plugin() == build_plugin() and build_plugin().stat().st_size > 0


@pytest.mark.emulated
def test_counts_in_a_function_are_exact_and_linear(spin_elf):
    lo, hi = symbol_range(spin_elf, "spin", nm="arm-linux-gnueabihf-nm")
    qemu = ["qemu-arm", "-cpu", "cortex-a7", str(spin_elf)]
    counts = [count_in_range([*qemu, str(n)], lo, hi) for n in (0, 1000, 2000)]
    per_iteration = (counts[2] - counts[1]) / 1000
    assert counts[1] - counts[0] == counts[2] - counts[1] > 0  # exactly linear in the loop count
    assert 2 <= per_iteration <= 10  # a handful of instructions per loop iteration
    assert count_in_range([*qemu, "1000"], lo, hi) == counts[1]  # deterministic
    assert count_in_range([*qemu, "1000"]) > counts[1]  # the whole program includes startup
