"""``frugalrt`` command line: a thin layer over the Python API.

Each subcommand is a function registered with :func:`command`; it receives parsed arguments and
returns an exit code. Errors derived from :class:`FrugalError` print one clear line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from frugalrt.errors import FrugalError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn`` as subcommand ``name``; ``configure`` adds its arguments."""

    def wrap(fn: Handler) -> Handler:
        _COMMANDS[name] = (help, configure, fn)
        return fn

    return wrap


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugalrt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, configure, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        configure(p)
        p.set_defaults(_handler=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._handler(args) or 0)
    except FrugalError as e:
        print(f"frugalrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --- subcommands (each section owned by one area: export, targets, runtime, devices, nn) ---------

# --- export (EXPORT) ------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="file.py:factory (factory() returns (model, example_inputs); default factory: build) "
                        "or a torch.export .pt2 archive with example inputs")
    p.add_argument("--out", required=True, help="ONNX file to write (atomically)")
    p.add_argument("--portable", action="store_true",
                   help="standard ONNX ops only (binary weights stay bit-packed), for any ONNX runtime")
    p.add_argument("--batch-check", action="store_true",
                   help="also check batch 1 and twice the example batch in ONNX Runtime (dynamic batch)")


@command("export", "export a PyTorch model with frugal layers to ONNX and check it in ONNX Runtime", _export_args)
def _export(args: argparse.Namespace) -> int:
    import time

    import torch

    from frugalrt.export.exporter import export, frozen_copy
    from frugalrt.export.source import load_source
    from frugalrt.export.summary import summarize
    from frugalrt.runtime import ort
    from frugalrt.runtime.validate import ATOL, compare

    start = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {text}", file=sys.stderr, flush=True)

    step(f"loading {args.source} (a factory may train first)")
    model, inputs = load_source(args.source)
    step(f"exporting {type(model).__name__} to {args.out} "
         f"({'standard ops only' if args.portable else 'ai.frugalrt custom ops'}) and checking it (onnx.checker)")
    proto = export(model, inputs, args.out, portable=args.portable)
    step("comparing ONNX Runtime with PyTorch")
    print(summarize(args.out).format())
    model = frozen_copy(model)
    batches = {"example inputs": inputs}
    if args.batch_check:
        batches["batch 1"] = tuple(t[:1] for t in inputs)
        batches["batch x2"] = tuple(torch.cat([t, t]) for t in inputs)
    session, passed = ort.make_session(proto), True
    print("ONNX Runtime vs PyTorch   batch  output   max abs     max rel   argmax agree")
    for name, batch in batches.items():
        with torch.no_grad():
            want = [t.numpy() for t in torch.utils._pytree.tree_leaves(model(*batch))]
        got = ort.run(session, [t.numpy() for t in batch])
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            a = compare(str(i), g, w, "float", rtol=1e-5, atol=ATOL)
            passed &= a.passed
            argmax = "-" if a.argmax_agreement is None else f"{a.argmax_agreement:.1%}"
            print(f"  {name:<22} {len(batch[0]):>5}  {i:>6}  {a.max_abs:10.3g}  {a.max_rel:10.3g}   "
                  f"{argmax:>6}  {'ok' if a.passed else 'MISMATCH (rtol 1e-5)'}")
    step(f"wrote {args.out}" + ("" if passed else " (ONNX Runtime disagrees with PyTorch)"))
    return 0 if passed else 1


# --- targets and runtime: compile, validate, targets (COMPILE) -------------------------------------
def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model exported by `frugalrt export`")
    p.add_argument("--target", required=True, help="target name (see `frugalrt targets`)")
    p.add_argument("--out", required=True, help="artifact directory to write (replaced atomically)")


@command("compile", "compile an ONNX model for a target into an artifact directory", _compile_args)
def _compile(args: argparse.Namespace) -> int:
    from frugalrt.targets.compile import compile as compile_model

    artifact = compile_model(args.model, args.target, args.out,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {artifact.path} ({artifact.kind} for {artifact.target})")
    return 0


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact directory written by `frugalrt compile`")
    p.add_argument("--device", default="local",
                   help="local (default), rpc://HOST:PORT, tracker://HOST:PORT/KEY, qemu or qemu:BOARD")
    p.add_argument("--emulate", action="store_true", help="run under qemu (same as --device qemu:BOARD)")
    p.add_argument("--board", help="qemu board for --emulate (e.g. mps2-an386)")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of float outputs")


@command("validate", "run an artifact on golden vectors and compare with PyTorch's outputs", _validate_args)
def _validate(args: argparse.Namespace) -> int:
    from frugalrt.runtime.validate import validate

    device = (f"qemu:{args.board}" if args.board else "qemu") if args.emulate else args.device
    report = validate(args.artifact, device=device, rtol=args.rtol)
    print(report.table())
    return 0 if report.passed else 1


@command("targets", "list compile targets and whether their tools are installed", lambda p: None)
def _targets(args: argparse.Namespace) -> int:
    from frugalrt.targets.registry import TARGETS

    print(f"{'TARGET':<15}{'ARTIFACT':<13}{'RUNS ON':<13}{'NEEDS':<44}DESCRIPTION")
    for t in TARGETS.values():
        missing = set(t.missing_tools())
        needs = ", ".join(f"{tool}{' (missing)' if tool in missing else ''}" for tool in t.needs) or "-"
        print(f"{t.name:<15}{t.artifact:<13}{t.runner:<13}{needs:<44}{t.description}")
    return 0


# --- devices: emulated devices, RPC servers and trackers (DEVICES) ---------------------------------
def _device_args(p: argparse.ArgumentParser) -> None:
    from frugalrt.runtime.emulator import DEVICE_KINDS

    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("start", help="start a device; prints its address rpc://HOST:PORT")
    s.add_argument("kind", choices=list(DEVICE_KINDS),
                   help="; ".join(f"{k}: {d}" for k, (d, _) in DEVICE_KINDS.items()))
    s.add_argument("--port", type=int, help="port to listen on (default: a free one)")
    s.add_argument("--name", help="name for stop/list (default: the kind, numbered if taken)")
    s.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker")
    s.add_argument("--key", help="tracker key (default: the kind)")
    t = sub.add_parser("stop", help="stop devices started by frugalrt")
    t.add_argument("names", nargs="*", metavar="NAME")
    t.add_argument("--all", action="store_true", help="stop every device and tracker")
    sub.add_parser("list", help="show running devices and trackers")
    tr = sub.add_parser("tracker", help="start a TVM RPC tracker; prints tracker://HOST:PORT")
    tr.add_argument("tracker_action", choices=["start"])
    tr.add_argument("--port", type=int)


@command("device", "start, stop and list emulated devices and RPC trackers", _device_args)
def _device(args: argparse.Namespace) -> int:
    from frugalrt.errors import DeviceError
    from frugalrt.runtime import emulator

    if args.action == "start":
        print(emulator.start_device(args.kind, args.port, args.name, args.tracker, args.key).address)
    elif args.action == "tracker":
        print(emulator.start_tracker(args.port).address)
    elif args.action == "stop":
        if not args.names and not args.all:
            raise DeviceError("name the devices to stop or pass --all (see `frugalrt device list`)")
        for name in emulator.stop_devices(None if args.all else args.names):
            print(f"stopped {name}")
    else:
        rows = [(r.name, r.kind, r.address, str(r.pid), r.options.get("key", ""))
                for r in emulator.list_devices()]
        if not rows:
            print("no devices running (start one with `frugalrt device start rpi4-emu`)")
        for row in [("NAME", "KIND", "ADDRESS", "PID", "TRACKER KEY")] + rows if rows else []:
            print("  ".join(f"{c:<{w}}" for c, w in zip(row, (14, 9, 28, 8, 12))).rstrip())
    return 0


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact directory written by `frugalrt compile`")
    p.add_argument("--device", default="local", help="local (default), rpc://HOST:PORT or tracker://HOST:PORT/KEY")
    p.add_argument("--runs", type=int, default=100, help="timed runs (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default 10)")
    p.add_argument("--baseline", metavar="MODEL.onnx", help="also compile and profile this model (e.g. the "
                   "dense equivalent) for the same target and print the ratio")
    p.add_argument("--json", metavar="OUT.json", help="write the report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write a latency histogram and per-op bars (matplotlib)")
    p.add_argument("--devices", type=int, default=1, help="with a tracker device: profile K devices in parallel")
    p.add_argument("--no-count", action="store_true", help="skip the instruction count on emulated devices")
    p.add_argument("--emulate", action="store_true", help="c-bundle/armv7 artifacts: instruction count under qemu")
    p.add_argument("--board", help="qemu board for --emulate (e.g. mps2-an386)")


@command("profile", "latency, per-op breakdown, footprint and instruction counts of an artifact", _profile_args)
def _profile(args: argparse.Namespace) -> int:
    import json

    from frugalrt._atomic import atomic_path
    from frugalrt.runtime import profile

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.emulate and (args.plot or args.devices > 1):
        raise FrugalError("--emulate reports instruction counts: --plot and --devices do not apply")
    if args.devices > 1 and (args.plot or args.baseline):
        raise FrugalError("--devices profiles the artifact on several devices: drop --plot and --baseline "
                          "(profile the baseline with one device)")
    if args.emulate:
        result = profile.profile_emulated(args.artifact, args.board, args.baseline, say)
        print(profile.emulated_table(result))
        text = json.dumps(result, indent=1)
    elif args.devices > 1:
        reports = profile.profile_many(args.artifact, args.device, args.devices, args.runs, args.warmup, say)
        print("\n\n".join(r.table() for r in reports))
        text = json.dumps({"devices": [json.loads(r.to_json()) for r in reports]}, indent=1)
    else:
        report = profile.profile(args.artifact, args.device, args.runs, args.warmup, args.baseline,
                                 not args.no_count, say)
        print(report.table())
        text = report.to_json()
        if args.plot:
            from frugalrt.runtime.profile_plot import plot

            plot(report, args.plot)
            say(f"wrote {args.plot}")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(text)
        say(f"wrote {args.json}")
    return 0


# --- nn: compress dense layers to butterflies (PACBAYES) --------------------------------------------
def _compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="file.py:factory returning (model, example_inputs); the file may define "
                                  "finetune_data() and eval_data() returning labelled (x, y) tensors")
    p.add_argument("--layers", nargs="+", required=True, metavar="NAME",
                   help="names of nn.Linear layers to replace (as in model.named_modules(), e.g. 0 2 or fc1)")
    p.add_argument("--out", required=True, help="compressed model to write: .onnx (frugalrt export) or .pt2")
    p.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                   help="fine-tune the compressed model for EPOCHS on finetune_data() (default 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for fine-tuning (default 1e-3)")


@command("compress", "replace nn.Linear layers by butterfly factorizations, fine-tune, export", _compress_args)
def _compress(args: argparse.Namespace) -> int:
    from frugalrt.nn.compress import compress_source

    report = compress_source(args.source, args.layers, args.out, args.finetune, args.lr,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(report.table())
    print(f"wrote {args.out}")
    return 0


# --- microcontroller bundles (MCU) ----------------------------------------------------------------


def _memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact of a C-bundle target (cortex-m4, cortex-m7, armv7, rpi-zero)")
    p.add_argument("--board", help="board whose firmware is measured (mps2-an386, mps2-an500, netduinoplus2)")


@command("memory", "flash and RAM of an artifact's firmware and its static buffer plan", _memory_args)
def _memory(args: argparse.Namespace) -> int:
    from frugalrt.targets.cbundle.run import memory_report

    print(memory_report(args.artifact, args.board))
    return 0


if __name__ == "__main__":
    sys.exit(main())
