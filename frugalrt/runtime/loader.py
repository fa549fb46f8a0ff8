"""``frugalrt.load(artifact_dir, device="local") -> Session``; the ``local`` device (Relax VM here).

The local session keeps the hot path lean: inputs are copied into TVM tensors allocated once per
shape (no per-call allocation on the input side) and the VM function is looked up once.
"""
from __future__ import annotations

import os

import numpy as np

from frugalrt.errors import ArtifactError, DeviceError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.devices import Session, open_device, register_device

LOCAL_TARGETS = ("host", "x86-64-v1")  # shared libraries this x86-64 machine can load


class LocalSession:
    """A Relax VM over ``lib.so`` on this machine's CPU."""

    def __init__(self, artifact: Artifact):
        import tvm
        from tvm import relax

        if artifact.kind != "shared-lib" or artifact.target not in LOCAL_TARGETS:
            raise DeviceError(f"{artifact.path}: a {artifact.target} {artifact.kind} cannot run on this machine "
                              f"(device local runs {', '.join(LOCAL_TARGETS)}); use --device rpc://HOST:PORT, "
                              "qemu or qemu:BOARD")
        if not artifact.lib_path.is_file():
            raise ArtifactError(f"{artifact.lib_path} is missing; recompile the artifact")
        self.artifact = artifact
        try:
            self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.lib_path)), tvm.cpu())
        except Exception as e:  # noqa: BLE001  (TVM raises its own error types for a corrupt library)
            raise ArtifactError(f"{artifact.lib_path}: cannot load ({e}); recompile the artifact") from e
        self._main = self.vm["main"]
        self._buffers: dict[tuple[int, tuple[int, ...]], object] = {}
        self._tensor = tvm.runtime.empty

    def _input(self, index: int, array: np.ndarray):
        key = (index, array.shape)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = self._tensor(array.shape, str(array.dtype))
        buffer.copyfrom(np.ascontiguousarray(array))
        return buffer

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        self.artifact.check_inputs(inputs)
        result = self._main(*(self._input(i, x) for i, x in enumerate(inputs)))
        if hasattr(result, "numpy"):  # one output: a tensor; several: an array of tensors
            return [result.numpy()]
        return [r.numpy() for r in result]

    def close(self) -> None:
        self._buffers.clear()


def _open_local(artifact: Artifact, device: str) -> Session:
    return LocalSession(artifact)


register_device("local", _open_local)


def load(artifact_dir: str | os.PathLike, device: str = "local") -> Session:
    """Open the compiled artifact in ``artifact_dir`` on ``device`` (see ``frugalrt.runtime.devices``)."""
    return open_device(Artifact(artifact_dir), device)
