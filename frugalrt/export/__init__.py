"""torch -> ONNX with ``ai.frugalrt`` custom ops (or standard ops only, ``portable=True``).

``frugalrt.export`` is both this package and the export function: the module is callable, so
``frugalrt.export(model, example_inputs, path)`` works and ``frugalrt.export.schemas`` too.
"""
import sys
import types

from frugalrt.export import schemas  # noqa: F401  (registers the ONNX schemas)


def export(*args, **kwargs):
    from frugalrt.export.exporter import export as _export

    return _export(*args, **kwargs)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
