"""Static runners: one self-contained ARM executable per target, with the model built in.

A runner is a C bundle (TVM's C kernels, the straight-line driver, weights as constants, a static
arena; :mod:`frugalrt.targets.cbundle`) plus ``files/runner_main.c`` and the sources of
:mod:`.sources`, cross-compiled and linked ``-static`` (:mod:`.toolchains`). On the device it
needs nothing but a Linux kernel: it validates itself against the golden vectors it carries,
times inferences and kernels, and prints one JSON object (``runner --help`` style usage in
``runner_main.c``). ``frugalrt validate|profile --device adb://SERIAL`` or ``ssh://user@host``
push it, run it and read that JSON (:mod:`frugalrt.runtime.runner_device`).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import onnx

from frugalrt._atomic import atomic_path
from frugalrt.errors import TargetError
from frugalrt.targets.cbundle.check import io_values
from frugalrt.targets.runner.sources import Golden, write_runner_sources
from frugalrt.targets.runner.toolchains import RUNNER_BUILDS, RunnerBuild, runner_builds

__all__ = ["RUNNER_BUILDS", "RunnerBuild", "build_runners", "compile_runner", "runner_builds",
           "unsupported_reason"]

FILES = Path(__file__).with_name("files")
# The bundle's sources a runner compiles (model.c comes in through runner_ops.c).
BUNDLE_SOURCES = ("kernels.c", "weights.c", "frugalrt_runtime.c")
RUNNER_SOURCES = ("runner_main.c", "runner_ops.c", "runner_data.c")
# -ffp-contract=off: no FMA contraction, docs/ops.md rounds each product before the bias is added
COMMON_FLAGS = ("-O2", "-std=gnu11", "-ffp-contract=off", "-static", "-ffunction-sections", "-fdata-sections",
                "-Wl,--gc-sections")
COMPILE_TIMEOUT_S = 600


def unsupported_reason(model: onnx.ModelProto) -> Optional[str]:
    """Why the runner cannot run ``model`` (it takes and returns float32, one sample per call), or None."""
    for kind, value in io_values(model):
        tensor = value.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT:
            return f"{kind} {value.name!r} is not float32 (the runner takes and returns float32 tensors)"
        dims = tensor.shape.dim
        if kind == "input" and (not dims or (dims[0].HasField("dim_value") and dims[0].dim_value > 1)):
            return (f"input {value.name!r} has no batch dimension, or a fixed batch above 1 "
                    "(the runner runs one sample per call)")
    return None


def compile_runner(src: Path, build: RunnerBuild, out: Path, target: str) -> None:
    """Cross-compile the runner sources in ``src`` with ``build`` into ``out`` (written atomically)."""
    if shutil.which(build.cc) is None:
        raise TargetError(f"the {target} runner needs {build.cc}: apt-get install --no-install-recommends "
                          f"{build.package} (or run scripts/setup.sh as root)")
    flags = [*COMMON_FLAGS, *build.cflags]
    with atomic_path(out) as tmp:
        cmd = [build.cc, *flags, "-I", str(src), "-I", str(src / "include"),
               f'-DRUNNER_TARGET="{target}"', f'-DRUNNER_CFLAGS="{" ".join(build.cflags)}"',
               *(str(src / f) for f in RUNNER_SOURCES + BUNDLE_SOURCES), "-lm", "-o", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TargetError(f"{build.cc} did not finish building the {target} runner within "
                              f"{COMPILE_TIMEOUT_S} s") from None
        if proc.returncode:
            raise TargetError(f"{build.cc} failed to build the {target} {build.file}:\n{proc.stderr[-3000:]}")
        tmp.chmod(0o755)


def build_runners(model: onnx.ModelProto, target: str, out_dir: Path, *, golden: Optional[Golden],
                  bundle: Optional[Path] = None) -> list[dict]:
    """Build every runner of ``target`` into ``out_dir``; returns their manifest entries.

    ``bundle``: the model's C bundle when the artifact already has one (armv7, rpi-zero); else one
    is generated in a temporary directory (it is portable C: its nominal platform only sets its
    Makefile's default, the runner's flags come from :mod:`.toolchains`).
    """
    builds = runner_builds(target)
    reason = unsupported_reason(model)
    if reason:
        raise TargetError(f"no static runner for this model: {reason}")
    with tempfile.TemporaryDirectory(prefix="frugalrt-runner-") as tmp:
        src = Path(tmp) / "src"
        if bundle is None:
            from frugalrt.targets.cbundle import build_bundle
            from frugalrt.targets.registry import get_target

            bundle = Path(tmp) / "bundle"
            build_bundle(model, get_target("armv7"), bundle, golden=golden)
        shutil.copytree(bundle, src, ignore=shutil.ignore_patterns("build", "test", "boards"))
        shutil.copyfile(FILES / "runner_main.c", src / "runner_main.c")
        plan = json.loads((src / "plan.json").read_text())
        write_runner_sources(src, plan, model, golden, [o.name for o in model.graph.output])
        entries = []
        for build in builds:
            compile_runner(src, build, out_dir / build.file, target)
            entries.append({"file": build.file, "cc": build.cc, "cflags": [*COMMON_FLAGS, *build.cflags],
                            "libc": "glibc, statically linked", "cpu": build.cpu, "qemu": list(build.qemu)})
    return entries
