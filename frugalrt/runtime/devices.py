"""Device registry: where an artifact runs, by URI scheme (``local``, ``rpc://h:p``, ``qemu:BOARD``,
``adb://SERIAL``, ``ssh://user@host:port``...).

An opener ``opener(artifact, device) -> Session`` is registered per scheme; a Session is callable,
``session(*inputs) -> list[np.ndarray]``, and has ``.close()``. ``local`` is built in; the other
schemes register themselves when their provider module (:data:`PROVIDERS`) is imported, which
:func:`open_device` does on first use.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Protocol

import numpy as np

from frugalrt.errors import DeviceError
from frugalrt.runtime.artifact import Artifact


class Session(Protocol):
    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]: ...

    def close(self) -> None: ...


Opener = Callable[[Artifact, str], Session]
OPENERS: dict[str, Opener] = {}

# scheme -> module that registers it (imported lazily: they pull in TVM RPC, qemu helpers, ...)
PROVIDERS: dict[str, str] = {
    "local": "frugalrt.runtime.loader",
    "cuda": "frugalrt.runtime.cuda_device",  # cuda or cuda:N: this machine's NVIDIA GPU
    "rpc": "frugalrt.runtime.remote",
    "tracker": "frugalrt.runtime.remote",
    "qemu": "frugalrt.targets.cbundle.run",
    "adb": "frugalrt.runtime.runner_device",  # the artifact's static runner, pushed and run over adb or ssh
    "ssh": "frugalrt.runtime.runner_device",
}


def register_device(scheme: str, opener: Opener) -> None:
    OPENERS[scheme] = opener


def scheme_of(device: str) -> str:
    """``rpc://h:p`` -> ``rpc``, ``qemu:mps2-an386`` -> ``qemu``, ``local`` -> ``local``."""
    return device.split("://", 1)[0] if "://" in device else device.split(":", 1)[0]


def open_device(artifact: Artifact, device: str = "local") -> Session:
    scheme = scheme_of(device)
    if scheme not in OPENERS and scheme in PROVIDERS and importlib.util.find_spec(PROVIDERS[scheme]):
        importlib.import_module(PROVIDERS[scheme])
    if scheme not in OPENERS:
        raise DeviceError(f"unknown device {device!r} (scheme {scheme!r}); available schemes: "
                          f"{', '.join(sorted(OPENERS) or ['local'])} (e.g. local, rpc://HOST:PORT, "
                          "tracker://HOST:PORT/KEY, qemu:mps2-an386, adb://SERIAL, ssh://USER@HOST:PORT, cuda, cuda:N)")
    return OPENERS[scheme](artifact, device)
