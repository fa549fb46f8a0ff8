"""Server entry point, run as a script by the device Python under qemu (or by the host Python).

``python -m tvm.exec.rpc_server`` re-executes ``sys.executable`` in a PopenWorker, which fails under
qemu-user without binfmt_misc; TVM's in-process starters avoid that. This file must stay importable
without frugalrt (the device userland has only the TVM runtime): standard library and TVM only.

Modes: ``server`` prints ``FRUGALRT_READY <port>`` once bound and serves until its process group
is ended; it also registers ``frugalrt.device_info`` and ``frugalrt.vm_kernel_profile`` so a client can
profile per kernel *on the device* (an instrument callback cannot cross RPC). ``tracker`` runs a TVM
RPC tracker. ``count`` runs a model N times in C++ (time evaluator) for instruction counting.

Ports: without ``--port`` a server or tracker binds port 0 (the kernel picks a free port, so no
other process can take it between choosing and binding) and its ready line is how the parent
learns the port; with ``--port`` it binds that one (``--port-end`` for a range), or exits.
"""
import argparse
import json
import platform


def vm_kernel_profile(vm_module, func_name: str, rounds: int, threads: int) -> str:
    """Per-kernel times of ``func_name`` (inputs already set), measured without instrumentation.

    An instrument callback (``set_instrument``) costs microseconds per call, several times a small
    model's kernels, so it only *records* one inference: each packed call's symbol, its arguments and,
    for ``vm.builtin.alloc_storage``, the bytes allocated. Then, in each of ``rounds`` rounds, the C++
    time evaluator times the whole function (the median of 3 runs) and each kernel call (a symbol that
    is not a ``vm.builtin.*``) alone, once, on the arguments it got, in call order as in an inference
    (back-to-back calls of one kernel run slower under qemu). Kernels and whole are measured under
    the same conditions: their difference is the VM's own work (builtins, dispatch). ``threads`` > 0
    sets the TVM thread pool first.

    Returns JSON ``{"calls": [[symbol, bytes]], "kernels": [call index], "whole": [s per round],
    "times": [[s per kernel] per round]}``.
    """
    import tvm_ffi

    if threads > 0:
        tvm_ffi.get_global_func("runtime.config_threadpool")(1, threads)
    calls = []

    def record(func, symbol, before_run, ret_value, *args):
        if before_run:
            size = int(args[1][0]) if symbol == "vm.builtin.alloc_storage" else 0
            calls.append((str(symbol), func, args, size))
        return 0  # VMInstrumentReturnKind.NO_OP: run the call

    vm_module["set_instrument"](tvm_ffi.convert(record))
    try:
        vm_module["invoke_stateful"](func_name)
    finally:
        vm_module["set_instrument"](None)
    kernels = [i for i, c in enumerate(calls) if not c[0].startswith("vm.builtin.")]
    timers = []
    for n, i in enumerate(kernels):
        name = f"frugalrt.profile.kernel{n}"
        tvm_ffi.register_global_func(name, calls[i][1], override=True)
        timers.append((_timer(None, name, 1), calls[i][2]))
    whole = _timer(vm_module, "invoke_stateful", 3)
    result = {"calls": [[c[0], c[3]] for c in calls], "kernels": kernels, "whole": [], "times": []}
    for _ in range(rounds):
        result["whole"].append(whole(func_name))
        result["times"].append([timer(*args) for timer, args in timers])
    return json.dumps(result)


def _timer(module, name: str, repeat: int):
    """``name`` of ``module`` (None: the global registry) timed on the CPU: the median of ``repeat``
    single calls (seconds), after one untimed call."""
    import statistics
    import struct

    import tvm_ffi

    evaluate = tvm_ffi.get_global_func("runtime.RPCTimeEvaluator")(module, name, 1, 0, 1, repeat, 0, 100, 0, 1, 0, "")
    return lambda *args: statistics.median(struct.unpack(f"@{repeat}d", evaluate(*args)))


def _register(kind: str) -> None:
    import tvm_ffi

    info = json.dumps({"kind": kind, "machine": platform.machine(), "emulated": kind.endswith("-emu")})
    tvm_ffi.register_global_func("frugalrt.device_info", lambda: info, override=True)
    tvm_ffi.register_global_func("frugalrt.vm_kernel_profile", vm_kernel_profile, override=True)


def _code_range(lib: str) -> tuple:
    """[lo, hi) of the executable mappings of ``lib`` in this process (qemu emulates the maps)."""
    import os

    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and "x" in parts[1] and os.path.realpath(parts[5]) == os.path.realpath(lib):
                spans += [int(x, 16) for x in parts[0].split("-")]
    return (min(spans), max(spans)) if spans else (0, 0)


def _count(lib: str, inputs: str, number: int, expect: str) -> None:
    """Load ``lib``, bind the .npz inputs, warm up once, then run ``number`` times in C++.

    Prints where ``lib``'s code was mapped; with ``expect`` (that range, from an earlier run),
    exits 3 if it moved, so a count restricted to that range can never silently miss."""
    import sys

    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(lib), dev)
    lo, hi = _code_range(lib)
    print(f"FRUGALRT_CODE {lo:#x} {hi:#x}", flush=True)
    if expect and expect != f"{lo:#x}-{hi:#x}":
        sys.exit(3)
    with np.load(inputs) as npz:
        vm.set_input("main", *[tvm.runtime.tensor(npz[f"input_{i}"], dev) for i in range(len(npz.files))])
    vm.invoke_stateful("main")
    if number:
        vm.time_evaluator("invoke_stateful", dev, number=number, repeat=1)("main")


def _bind_any(host: str):
    """A listening socket on ``host`` at a port the kernel picks (bind to port 0), and that port.

    TVM's in-process starters scan ``[port, port_end)`` and treat port 0 as a failure, so a parent
    had to guess a free port first (bind, close, pass it on): another process could take it in
    between. Binding here and handing the socket to TVM's own serving loops has no such window."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def _serve_on_any_port(mode: str, host: str, tracker, key: str) -> int:
    """What ``_popen_start_{rpc,tracker}_server`` do (a thread running TVM's loop on a bound
    socket), on a socket bound to port 0; returns the port."""
    import threading

    sock, port = _bind_any(host)
    if mode == "tracker":
        from tvm.rpc import base
        from tvm.rpc.tracker import _tracker_server

        loop, args = _tracker_server, (sock, base.random_key("tracker"))
    else:
        from tvm.rpc.server import _listen_loop

        loop, args = _listen_loop, (sock, port, key, tracker, None, None)
    threading.Thread(target=loop, args=args).start()
    return port


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "tracker", "count"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="first port to try (default: any free port, chosen by the kernel)")
    p.add_argument("--port-end", type=int, help="end of the port range to try (default: --port + 1)")
    p.add_argument("--tracker", help="host:port of an RPC tracker to register with")
    p.add_argument("--key", default="")
    p.add_argument("--kind", default="host", help="device kind reported by frugalrt.device_info")
    p.add_argument("--lib")
    p.add_argument("--inputs")
    p.add_argument("--number", type=int, default=0)
    p.add_argument("--expect-code", default="", help="lo-hi that the count's code range must be")
    a = p.parse_args()
    if a.mode == "count":
        return _count(a.lib, a.inputs, a.number, a.expect_code)
    tracker = None
    if a.mode == "server":
        _register(a.kind)
        if a.tracker:
            host, _, tport = a.tracker.rpartition(":")
            tracker = (host, int(tport))
    if a.port is None:
        port = _serve_on_any_port(a.mode, a.host, tracker, a.key)
    elif a.mode == "tracker":
        from tvm.rpc.tracker import _popen_start_tracker_server

        port, _ = _popen_start_tracker_server(a.host, a.port, a.port_end or a.port + 1)
    else:
        from tvm.rpc.server import _popen_start_rpc_server

        port = _popen_start_rpc_server(a.host, a.port, a.port_end or a.port + 1, tracker_addr=tracker, key=a.key)
    print(f"FRUGALRT_READY {port}", flush=True)  # the serving thread keeps the process alive


if __name__ == "__main__":
    main()
