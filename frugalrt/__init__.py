"""frugalrt: keep butterfly and binarized layers structured from PyTorch to the device.

Pipeline: ``frugalrt.nn`` layers -> ``frugalrt.export`` (ONNX, ``ai.frugalrt`` ops) ->
``frugalrt.compile`` (Apache TVM, per-target kernels) -> ``frugalrt.load`` / ``validate`` / profile.
"""
from importlib import import_module

__version__ = "0.1.0"

from frugalrt import export  # noqa: E402  (callable module: frugalrt.export(model, inputs, path))

# Lazily imported public functions (TVM is heavy: importing frugalrt must stay cheap).
_LAZY = {
    "compile": "frugalrt.targets.compile",
    "load": "frugalrt.runtime.loader",
    "validate": "frugalrt.runtime.validate",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'frugalrt' has no attribute {name!r}")


__all__ = ["export", "compile", "load", "validate", "__version__"]
