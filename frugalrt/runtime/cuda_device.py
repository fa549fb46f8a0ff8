"""The ``cuda`` device (``cuda`` or ``cuda:N``): a cuda-lib artifact on this machine's NVIDIA GPU.

TVM's wheel loads its CUDA runtime (``tvm/lib/libtvm_runtime_cuda.so``) lazily and skips it
silently when the NVIDIA driver (``libcuda.so.1``) or the CUDA runtime (``libcudart.so.13``) is
missing: CUDA modules then fail much later with "a loader of that name (cuda) is not registered".
:func:`cuda_problem` checks each piece up front and names the missing one and how to install it
(a CUDA runtime installed by pip, outside the loader's path, is found and loaded first).
Before loading, the GPU's architecture is checked against the fatbin's (manifest ``cuda``): SASS
of the same major version and no newer minor, or PTX no newer than the GPU.
"""
from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

from frugalrt.errors import ArtifactError, DeviceError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.devices import Session, register_device

# library -> (what it is, how to get it)
CUDA_LIBRARIES: dict[str, tuple[str, str]] = {
    "libcuda.so.1": ("the NVIDIA driver", "install the NVIDIA driver for the GPU (e.g. Debian/Ubuntu "
                     "`nvidia-driver`; in a container run it with `--gpus all`)"),
    "libcudart.so.13": ("the CUDA 13 runtime", "`pip install nvidia-cuda-runtime` (13.x) or the CUDA 13 "
                        "toolkit, with its lib directory on LD_LIBRARY_PATH"),
}


def _runtime_candidates(name: str) -> list[str]:
    """Where a CUDA runtime outside the loader's path usually is: pip's ``nvidia`` packages, the toolkit."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    toolkits = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    found = [p for root in roots for p in glob.glob(os.path.join(root, "*", "lib", name))]
    return found + [p for t in toolkits if t for p in glob.glob(os.path.join(t, "lib*", name))]


def _load(name: str):
    """``name`` loaded globally (so that TVM's CUDA runtime finds it), from the loader's path or a candidate."""
    try:
        return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError as first:
        for path in _runtime_candidates(name):
            try:
                return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
        raise first


def _library_problem(name: str) -> str | None:
    what, install = CUDA_LIBRARIES[name]
    try:
        lib = _load(name)
    except OSError as e:
        return f"{name} ({what}) cannot be loaded: {e}; {install}"
    if name == "libcuda.so.1" and not hasattr(lib, "cuInit"):
        return f"{name} is not {what} (no cuInit); {install}"
    return None


def cuda_problem(index: int = 0) -> str | None:
    """Why CUDA device ``index`` cannot run TVM code here (the first missing piece), None when it can."""
    for name in CUDA_LIBRARIES:
        problem = _library_problem(name)
        if problem:
            return problem
    import tvm
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        try:  # the wheel skipped it at import when a library above was missing then
            from tvm_ffi.libinfo import load_lib_ctypes

            _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                               mode="RTLD_LOCAL")
        except (OSError, RuntimeError) as e:
            return f"TVM's CUDA runtime (tvm/lib/libtvm_runtime_cuda.so) cannot be loaded: {e}"
    if not tvm.cuda(index).exist:
        return (f"no CUDA GPU {index} (the driver and CUDA runtime load, but the driver reports no such device; "
                "check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    return None


def device_index(device: str) -> int:
    """``cuda`` -> 0, ``cuda:1`` -> 1."""
    _, _, index = device.partition(":")
    if index and not index.isdigit():
        raise DeviceError(f"bad CUDA device {device!r}: use cuda or cuda:N")
    return int(index or 0)


def arch_problem(manifest: dict[str, Any], compute_version: str) -> str | None:
    """Why a GPU of ``compute_version`` (e.g. "9.0") cannot run the artifact's fatbin, None when it can."""
    cuda = manifest.get("cuda") or {}
    gpu = tuple(int(v) for v in compute_version.split("."))
    sass = [tuple(int(c) for c in divmod(int(a[3:]), 10)) for a in cuda.get("archs", [])]
    ptx = cuda.get("ptx")
    if any(major == gpu[0] and minor <= gpu[1] for major, minor in sass):
        return None
    if ptx and divmod(int(ptx[3:]), 10) <= gpu:
        return None
    return (f"the GPU is sm_{gpu[0]}{gpu[1]}, the artifact holds SASS for {', '.join(cuda.get('archs', []))} "
            f"and PTX {ptx}; recompile for a target covering it (`frugalrt targets`)")


class CudaSession:
    """A cuda-lib artifact's Relax VM on a local GPU; numpy in, numpy out. ``vm`` and ``dev`` serve
    ``frugalrt profile`` (TVM's time evaluator synchronizes the GPU)."""

    def __init__(self, artifact: Artifact, device: str = "cuda"):
        if artifact.kind != "cuda-lib":
            raise DeviceError(f"{artifact.path}: a {artifact.target} {artifact.kind} artifact does not run on "
                              "device cuda; compile with --target cuda, cuda-sm90 or jetson-orin")
        artifact.verify()
        index = device_index(device)
        problem = cuda_problem(index)
        if problem:
            raise DeviceError(f"device {device}: {problem}")
        import tvm
        from tvm import relax

        self.dev = tvm.cuda(index)
        problem = arch_problem(artifact.manifest, self.dev.compute_version)
        if problem:
            raise DeviceError(f"{artifact.path}: {problem}")
        try:
            module = tvm.runtime.load_module(str(artifact.lib_path))
            self.vm = relax.VirtualMachine(module, self.dev)
        except Exception as e:  # noqa: BLE001  (TVM raises its own error types for a bad library)
            raise ArtifactError(f"{artifact.lib_path}: cannot load on {device} ({e}); recompile the artifact") from e
        self.artifact, self._tvm = artifact, tvm
        bound = artifact.manifest.get("batch_bound")
        self._bound = bound if isinstance(bound, int) and bound > 0 else None

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        self.artifact.check_inputs(inputs)
        batch = max((x.shape[0] for x, spec in zip(inputs, self.artifact.inputs)
                     if x.ndim and spec["shape"][:1] == ["batch"]), default=0)
        if self._bound is not None and batch > self._bound:
            raise ArtifactError(f"{self.artifact.path}: batch {batch} exceeds the artifact's batch_bound {self._bound}; "
                                f"split the batch or recompile with batch_bound={batch} (0: no bound)")
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(x), self.dev) for x in inputs]
        result = self.vm["main"](*args)
        outputs = [result] if hasattr(result, "numpy") else list(result)
        return [r.numpy() for r in outputs]

    def close(self) -> None:
        self.vm = None


def _open_cuda(artifact: Artifact, device: str) -> Session:
    return CudaSession(artifact, device)


register_device("cuda", _open_cuda)
