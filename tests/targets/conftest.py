"""Shared by the target tests: the x86 CPU a test names, the register-scratch check, and a C bundle
built and run natively."""
import re
import subprocess

import numpy as np
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


@pytest.fixture
def run_bundle_natively(tmp_path, need_tools):
    """``run(bundle_dir, x) -> outputs [batch, -1]``: the bundle built for this machine with gcc
    (``-ffp-contract=off``, as the bundle's Makefile) and run on the float32 rows of ``x``."""
    need_tools("gcc", why="building the C bundle natively")
    from frugalrt.targets.cbundle import write_inputs

    def run(bundle, x: np.ndarray) -> np.ndarray:
        exe, work = tmp_path / "bundle_host", tmp_path / "run"
        subprocess.run(["gcc", "-O2", "-std=gnu11", "-ffp-contract=off", "-I.", "-Iinclude", "model.c", "weights.c",
                        "kernels.c", "frugalrt_runtime.c", "test/frugalrt_main.c", "-lm", "-o", str(exe)],
                       cwd=bundle, check=True, capture_output=True)
        work.mkdir(exist_ok=True)
        write_inputs(work / "frugalrt_in.bin", [x])
        subprocess.run([str(exe)], cwd=work, check=True, capture_output=True)
        return np.fromfile(work / "frugalrt_out.bin", np.float32).reshape(len(x), -1)

    return run
