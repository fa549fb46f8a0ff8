"""Shared by the CPU kernel tests: the x86 CPU a test names, and the register-scratch check."""
import re

import pytest


@pytest.fixture
def cpu(request, x86_cpu):
    """The X86Cpu named by the test's ``cpu`` parameter (indirect); skips unless this machine runs its
    code, naming the module's ``INSPECTED`` test that compiles and inspects it everywhere."""
    c = x86_cpu(request.param)
    c.require(request.module.INSPECTED)
    return c


@pytest.fixture
def scratch_in_registers():
    """``check(name, primfunc)``: asserts the kernel keeps its scratch in registers (see below)."""
    return _assert_scratch_in_registers


def _assert_scratch_in_registers(name: str, func) -> None:
    """In the Relax build a mutable TIR variable (TVMScript ``x = ...``; kernels bind values with
    ``T.let``) or a "local"-scope buffer becomes TVMBackendAllocWorkspace heap memory that LLVM cannot
    keep in registers: compiled artifacts ran up to 7x slower than the same kernels compiled alone."""
    script = func.script()
    mutable = [line.strip() for line in script.splitlines()
               if re.match(r"\s+\w+: T\.\w+ = ", line) and "T.let[" not in line]
    assert not mutable, (name, mutable)
    assert 'scope="local"' not in script, name
