"""``frugalrt.compile(model.onnx, target, out_dir) -> Artifact``: import, build, link, write.

The artifact directory is written atomically (a failure leaves nothing behind): ``model.onnx``
(a copy), ``golden.npz`` (PyTorch's outputs recorded in the model's metadata, when present),
``manifest.json`` and the library: ``lib.so`` (shared-lib targets, cross-linked; cuda-lib targets:
with the kernels embedded as an nvcc fatbin, ``frugalrt.targets.cuda_build``, and their source
``kernels.cu`` beside it for inspection) or ``bundle/`` (c-bundle,
built by ``frugalrt.targets.cbundle.build_bundle(mod, target, bundle_dir, golden=...)`` from the
model imported for TVM's C target with batch 1). The 32-bit ARM targets (armv7, rpi-zero), for
which no TVM runtime wheel exists, get both ``lib.so`` and ``bundle/``; their qemu-arm runner
validates the bundle. Every ARM target also gets ``runner`` (ARMv7: and ``runner-noneon``), a
statically linked executable with the model built in for ``adb://`` and ``ssh://`` devices
(``frugalrt.targets.runner``), recorded in the manifest's ``runners``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnx

import frugalrt
from frugalrt._atomic import atomic_path, check_output
from frugalrt.errors import TargetError
from frugalrt.export.metadata import read_golden, save_golden_npz
from frugalrt.runtime.artifact import GOLDEN, MANIFEST, MODEL, Artifact, file_digests
from frugalrt.targets import opnames
from frugalrt.targets.cbundle.check import check_bundle_model
from frugalrt.targets.importer import load_model
from frugalrt.targets.registry import DeviceTarget, get_target, llvm_target_info, target_spec, tvm_target
from frugalrt.targets.runner.toolchains import RUNNER_BUILDS

CUDA_CHECK_ARCHS = ("sm_75", "sm_87", "sm_90")
CUDA_SOURCE = "kernels.cu"
BUNDLE = "bundle"
LIB_FILES = {"shared-lib": "lib.so", "cuda-lib": "lib.so", "c-bundle": BUNDLE}
# Extra link flags per target. Android has no glibc: its library is linked without the C library
# and startup files (the few libc symbols, e.g. memcpy, bind at load time to bionic). The armhf
# toolchain's startup files and static libgcc are ARMv7 code, so the ARMv6 library embeds neither
# and takes libc and libgcc_s (e.g. __divdi3) from the Pi's own shared libraries instead.
# android-armv7's library follows Android's armeabi-v7a soft-float calling convention.
LINK_OPTIONS = {"android-arm64": ["-nostdlib"], "android-armv7": ["-nostdlib", "-mfloat-abi=softfp"],
                "rpi-zero": ["-nostdlib", "-Wl,--no-as-needed", "-lc", "-lgcc_s"]}

Progress = Callable[[str], None]


def compile(model_path: str | os.PathLike, target: str, out_dir: str | os.PathLike,
            progress: Progress | None = None, force: bool = False, board: str | None = None,
            batch_bound: int | None = None) -> Artifact:
    """Compile the ONNX model at ``model_path`` for ``target`` into the artifact directory ``out_dir``.

    ``batch_bound``: the largest batch of the shared library (CPU, CUDA), whose intermediate memory
    is then planned statically (default ``frugalrt.targets.passes.DEFAULT_BATCH_BOUND``, lowered
    for large activations, recorded in the manifest; 0: any batch, dynamic allocation); see
    :mod:`frugalrt.targets.passes`.

    ``out_dir`` is replaced only when it is empty or a frugalrt artifact (``force``: any directory
    but the working directory, the model's folder or one above them); see ``frugalrt._atomic``.
    """
    say = progress or (lambda message: None)
    check_output(out_dir, is_dir=True, inputs=[model_path], force=force)  # refuse before the slow steps
    device = get_target(target)
    _check_tools(device)
    model = load_model(model_path)
    check_bundle_model(model, device, board, source=model_path)  # C bundles: inputs, batch, --board
    import tvm  # noqa: F401  (load the compiler library once, outside the timed steps)

    steps = 4 + (device.runner == "qemu-arm") + (device.name in RUNNER_BUILDS)
    runners: dict = {}
    timed = _step_timer(say, device.name, steps)
    with atomic_path(out_dir, is_dir=True, inputs=[model_path], force=force) as tmp:
        with opnames.recording(tmp):  # frugalrt profile: the ONNX nodes of each kernel (targets/opnames.py)
            with timed("import"):
                mod = _import(model, device)
            with timed("build"):
                built, bound, plan = _build(mod, device, batch_bound)
            with timed("link"):
                _link(built, device, tmp, model, board, plan)
            if device.runner == "qemu-arm":  # no TVM runtime for 32-bit ARM: ship a self-contained C bundle too
                with timed("bundle"):
                    _build_bundle(model, device, tmp / BUNDLE, model)
            if device.name in RUNNER_BUILDS:  # every ARM target: static runners for adb:// and ssh:// devices
                with timed("runner"):
                    runners = _build_runners(model, device, tmp, say)
        with timed("write"):  # after opnames.json, so that the manifest's sha256 covers it
            _write(model, device, tmp, bound, runners, plan)
    return Artifact(out_dir)


def _step_timer(say: Progress, target: str, total: int):
    """``with timed(name):`` prints ``[i/total] name (target): seconds`` after each step."""
    count = [0]

    @contextlib.contextmanager
    def timed(name: str):
        start = time.perf_counter()
        yield
        count[0] += 1
        say(f"[{count[0]}/{total}] {name} ({target}): {time.perf_counter() - start:.1f} s")

    return timed


def _check_tools(device: DeviceTarget) -> None:
    needed = ([device.cross_cc] if device.cross_cc else []) + [b.cc for b in RUNNER_BUILDS.get(device.name, ())]
    missing = sorted({tool for tool in needed if shutil.which(tool) is None})
    if missing:
        raise TargetError(f"target {device.name} needs {', '.join(missing)} to link; install it "
                          "(Debian packages g++-aarch64-linux-gnu, gcc-arm-linux-gnueabihf, gcc-arm-linux-gnueabi; "
                          "scripts/setup.sh as root)")


def _import(model: onnx.ModelProto, device: DeviceTarget):
    from frugalrt.targets.importer import import_onnx

    # A C bundle is fully static (no allocator on a microcontroller): batch 1.
    return import_onnx(model, tvm_target(device), batch=1 if device.artifact == "c-bundle" else None)


def _build(mod, device: DeviceTarget, batch_bound: int | None = None):
    """(built module, the batch bound of main's statically planned memory or None: any batch, the
    static plan of main or None: ``frugalrt.targets.static_plan``)."""
    if device.artifact == "c-bundle":
        return mod, None, None  # the bundle builder compiles its kernels with TVM's C codegen itself
    import tvm

    from frugalrt.targets import passes, static_plan
    from frugalrt.targets.kernels.standard import lower_standard_ops

    target = tvm_target(device)
    mod = lower_standard_ops(mod, target)  # fast standard-op kernels, before passes legalize the rest
    mod = passes.optimize(mod, target, passes.DEFAULT_BATCH_BOUND if batch_bound is None else batch_bound)
    bound = passes.planned_bound(mod)
    plan = None
    if device.artifact == "shared-lib":
        mod, plan, _ = static_plan.attach(mod, passes.batch_var(mod["main"]))
    with target:
        built = tvm.compile(mod, target=target)
    return built, bound, plan if plan and static_plan.check_kernels(plan, built) is None else None


def _link(built, device: DeviceTarget, out: Path, model: onnx.ModelProto, board: str | None = None,
          plan: dict | None = None) -> None:
    lib = out / LIB_FILES[device.artifact]
    if device.artifact == "shared-lib":
        from tvm.support import cc

        from frugalrt.targets import static_plan

        fcompile = None
        if device.cross_cc:
            fcompile = cc.cross_compiler(device.cross_cc, options=LINK_OPTIONS.get(device.name))
        with tempfile.TemporaryDirectory(prefix="frugalrt-link-") as work:
            addons, options = [], []
            if plan:  # the static plan as one C function beside the kernels (frugalrt.runtime.plan)
                driver = Path(work) / "frugalrt_plan.c"
                driver.write_text(static_plan.driver_source(plan))
                addons, options = [str(driver)], static_plan.driver_options()
            built.export_library(str(lib), fcompile=fcompile, addons=addons, options=options)
    elif device.artifact == "cuda-lib":
        _link_cuda(built, device, lib)
    else:
        _build_bundle(built, device, lib, model, board)


def _build_bundle(mod, device: DeviceTarget, bundle_dir: Path, model: onnx.ModelProto,
                  board: str | None = None) -> None:
    from frugalrt.targets.cbundle import build_bundle

    build_bundle(mod, device, bundle_dir, board=board, golden=read_golden(model))  # board: fit checked


def _build_runners(model: onnx.ModelProto, device: DeviceTarget, out: Path, say: Progress) -> dict:
    """The manifest entries of the target's static runners (frugalrt.targets.runner), or why there are none."""
    from frugalrt.targets.runner import build_runners, unsupported_reason

    reason = unsupported_reason(model)
    if reason:
        say(f"no static runner: {reason}")
        return {"runner_skipped": reason}
    bundle = out / BUNDLE
    try:
        entries = build_runners(model, device.name, out, golden=read_golden(model),
                                bundle=bundle if bundle.is_dir() else None)
    except Exception as e:  # noqa: BLE001  (the runner is extra: lib.so stands; the manifest says why)
        reason = f"the C bundle the runner is built from failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        say(f"no static runner: {reason}")
        return {"runner_skipped": reason}
    return {"runners": entries}


# --- cuda-lib targets (frugalrt.targets.cuda_build) ---------------------------------------------
def _link_cuda(built, device: DeviceTarget, lib: Path) -> None:
    """``lib.so`` with the kernels as an nvcc fatbin for the target's archs; ``kernels.cu`` beside it."""
    from tvm.support import cc

    from frugalrt.targets.cuda_build import compile_fatbin, pack_imports_with_fatbin

    source = cuda_source(built)
    (lib.parent / CUDA_SOURCE).write_text(source)
    fatbin = compile_fatbin(source, device.name)
    fcompile = cc.cross_compiler(device.cross_cc) if device.cross_cc else None
    built.export_library(str(lib), fcompile=fcompile, fpack_imports=pack_imports_with_fatbin(source, fatbin))


def _cuda_entries(device: DeviceTarget) -> dict:
    """``cuda``: the SASS archs and PTX arch of the embedded fatbin and the source file (cuda-lib only)."""
    if device.artifact != "cuda-lib":
        return {}
    from frugalrt.targets.cuda_build import CUDA_ARCHS

    archs, ptx = CUDA_ARCHS[device.name]
    return {"cuda": {"format": "fatbin", "archs": list(archs), "ptx": ptx, "source": CUDA_SOURCE,
                     "fast_math": False}}


def cuda_source(executable) -> str:
    """The CUDA C source of every kernel in a Relax executable built for a CUDA target."""
    from frugalrt.targets.cuda_build import cuda_source as source

    return source(executable)


def check_cuda_source(path: Path, archs: tuple[str, ...] = CUDA_CHECK_ARCHS) -> list[str]:
    """Compile ``path`` with nvcc for each arch (to a throwaway cubin); the archs checked, [] without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            run = subprocess.run([nvcc, "--cubin", f"-arch={arch}", "-o", os.path.join(tmp, f"{arch}.cubin"),
                                  str(path)], capture_output=True, text=True)
            if run.returncode != 0:
                raise TargetError(f"nvcc -arch={arch} rejected the generated {path.name}:\n{run.stderr[-2000:]}")
    return list(archs)


def _write(model: onnx.ModelProto, device: DeviceTarget, out: Path, batch_bound: int | None = None,
           runners: dict | None = None, plan: dict | None = None) -> None:
    data = model.SerializeToString()
    (out / MODEL).write_bytes(data)
    golden = read_golden(model)
    if golden is not None:
        save_golden_npz(out / GOLDEN, *golden)
    manifest = {
        "target": device.name,
        "artifact": device.artifact,
        "tvm_target": target_spec(device),  # what was compiled for: host's detected mcpu included
        **_cpu_entries(device),  # llvm_target (triple, mcpu, mattr) and cpu_features
        **_cuda_entries(device),  # cuda: archs and PTX of the embedded fatbin (cuda-lib targets)
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "frugalrt_version": frugalrt.__version__,
        "tvm_version": _tvm_version(),
        "inputs": [_value_info(v) for v in _graph_inputs(model)],
        "outputs": [_value_info(v) for v in model.graph.output],
        "param_bytes": sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer),
        **({"batch_bound": batch_bound} if batch_bound else {}),  # main's memory is planned for batch <= it
        **({"plan": plan} if plan else {}),  # main as kernel calls, run without the VM (frugalrt.runtime.plan)
        "files": {"lib": LIB_FILES[device.artifact], "model": MODEL,
                  **({"golden": GOLDEN} if golden is not None else {}),
                  **({"bundle": BUNDLE} if device.runner == "qemu-arm" else {}),
                  **{r["file"]: r["file"] for r in (runners or {}).get("runners", [])}},
        **(runners or {}),  # runners: file, cc, cflags, libc, cpu, qemu of each; or runner_skipped: why none
        "sha256": file_digests(out),  # every file but the manifest, checked by Artifact.verify()
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _cpu_entries(device: DeviceTarget) -> dict:
    """``llvm_target``: the LLVM triple, mcpu and mattr compiled for (None for the C and CUDA targets);
    ``cpu_features``: what the code may use (x86: the ISA extensions mcpu + mattr enable, checked
    before a local load; other LLVM targets: the mattr features; [] for C and CUDA)."""
    llvm = llvm_target_info(device)
    if llvm is None:
        return {"llvm_target": None, "cpu_features": []}
    features = llvm.pop("cpu_features")
    return {"llvm_target": llvm, "cpu_features": features}


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def _graph_inputs(model: onnx.ModelProto) -> list:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _value_info(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    if shape and isinstance(shape[0], str):
        shape[0] = "batch"  # the dynamic leading dimension, whatever the exporter named it
    return {"name": value.name, "shape": shape,
            "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))}
