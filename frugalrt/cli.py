"""``frugalrt`` command line: a thin layer over the Python API.

Each subcommand is a function registered with :func:`command`; it receives parsed arguments and
returns an exit code. Every error is one line on stderr and a non-zero exit (2; 130 when
interrupted): a :class:`FrugalError` prints its message, anything else its type and message, and
``--debug`` adds the traceback. SIGTERM is handled like Ctrl-C, so outputs being written are
removed (``frugalrt._atomic``).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import Callable, NoReturn

from frugalrt.errors import FrugalError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn`` as subcommand ``name``; ``configure`` adds its arguments."""

    def wrap(fn: Handler) -> Handler:
        _COMMANDS[name] = (help, configure, fn)
        return fn

    return wrap


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the default prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, minimum: float, name: str, maximum: float = float("inf")) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` in [minimum, maximum] (argparse names the option on error)."""

    def parse(text: str):
        value = kind(text)
        if not (minimum <= value <= maximum < float("inf") or minimum <= value < maximum):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
        return value

    parse.__name__ = kind.__name__  # argparse's message: "invalid float value"
    return parse


TOLERANCE = _number(float, 0.0, "a finite number >= 0")
COUNT = _number(int, 1, "an integer >= 1")
ZERO_OR_MORE = _number(int, 0, "an integer >= 0")
PORT = _number(int, 1, "a port number (1-65535)", 65535)
POSITIVE = _number(float, 1e-300, "a positive number")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="frugalrt", description=__doc__.splitlines()[0])
    debug = dict(action="store_true", help="on error, print the full traceback")
    parser.add_argument("--debug", **debug)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_, configure, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--debug", **{**debug, "default": argparse.SUPPRESS})
        configure(p)
        p.set_defaults(_handler=fn)
    return parser


def _terminate(signum, frame) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed in one line
        return int(e.code or 0)
    if not args.debug:  # library deprecation chatter is not the user's business; --debug shows it
        warnings.simplefilter("ignore")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args._handler(args) or 0)
    except KeyboardInterrupt:
        print(f"frugalrt {args.command}: interrupted (nothing half-written was left)", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001  (SystemExit included: a library must not end the CLI silently)
        if isinstance(e, SystemExit) and e.code in (0, None):
            return 0
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"frugalrt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(error: BaseException) -> str:
    """A FrugalError's own message; for anything else, its type, first line and a --debug hint."""
    text = " ".join(str(error).split()) if isinstance(error, FrugalError) else str(error).strip()
    if isinstance(error, FrugalError):
        return text
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:300]} (unexpected; rerun with --debug for the traceback)"


# --- subcommands (each section owned by one area: export, targets, runtime, devices, nn) ---------

# --- export (EXPORT) ------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="file.py:factory (factory() returns (model, example_inputs); default factory: build) "
                        "or a torch.export .pt2 archive with example inputs. A file.py SOURCE is RUN as Python "
                        "code (like `python file.py`): export only files you trust. A .pt2 archive is loaded "
                        "weights-only (no pickled code runs)")
    p.add_argument("--out", required=True, help="ONNX file to write (atomically); an existing file is replaced "
                   "only if it is a .onnx file")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a .onnx file")
    p.add_argument("--portable", action="store_true",
                   help="standard ONNX ops only (binary weights stay bit-packed), for any ONNX runtime")
    p.add_argument("--float-activations", action="store_true",
                   help="keep float32 activations between binary layers (default: packed sign bits, "
                        "docs/ops.md \"Packed activations\"; custom ops only)")
    p.add_argument("--batch-check", action="store_true",
                   help="also check batch 1 and twice the example batch in ONNX Runtime (dynamic batch)")


@command("export", "export a PyTorch model with frugal layers to ONNX and check it in ONNX Runtime", _export_args)
def _export(args: argparse.Namespace) -> int:
    import time

    import os

    import torch

    from frugalrt._atomic import check_output
    from frugalrt.export.exporter import export, frozen_copy
    from frugalrt.export.source import load_source
    from frugalrt.export.summary import summarize
    from frugalrt.runtime import ort
    from frugalrt.runtime.validate import ATOL, accumulation_length, compare

    start = time.perf_counter()
    source = args.source.partition(":")[0] if not os.path.exists(args.source) else args.source
    out = dict(protect=[source], force=args.force)
    check_output(args.out, inputs=[source], force=args.force, suffixes=(".onnx",))  # before training

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {text}", file=sys.stderr, flush=True)

    step(f"loading {args.source} (a factory may train first)")
    model, inputs = load_source(args.source)
    step(f"exporting {type(model).__name__} to {args.out} "
         f"({'standard ops only' if args.portable else 'ai.frugalrt custom ops'}) and checking it (onnx.checker)")
    proto = export(model, inputs, args.out, portable=args.portable, pack_activations=not args.float_activations,
                   **out)
    step("comparing ONNX Runtime with PyTorch")
    print(summarize(args.out).format())
    model = frozen_copy(model)
    batches = {"example inputs": inputs}
    if args.batch_check:
        batches["batch 1"] = tuple(t[:1] for t in inputs)
        batches["batch x2"] = tuple(torch.cat([t, t]) for t in inputs)
    session, passed, length = ort.make_session(proto), True, accumulation_length(proto)
    print("ONNX Runtime vs PyTorch   batch  output   max abs     max rel   argmax agree")
    for name, batch in batches.items():
        with torch.no_grad():
            want = [t.numpy() for t in torch.utils._pytree.tree_leaves(model(*batch))]
        got = ort.run(session, [t.numpy() for t in batch])
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            a = compare(str(i), g, w, "float", rtol=1e-5, atol=ATOL, accumulation=length)
            passed &= a.passed
            argmax = "-" if a.argmax_agreement is None else f"{a.argmax_agreement:.1%}"
            print(f"  {name:<22} {len(batch[0]):>5}  {i:>6}  {a.max_abs:10.3g}  {a.max_rel:10.3g}   "
                  f"{argmax:>6}  {'ok' if a.passed else f'MISMATCH ({a.outside} outside tolerance)'}")
    step(f"wrote {args.out}" + ("" if passed else " (ONNX Runtime disagrees with PyTorch)"))
    return 0 if passed else 1


# --- targets and runtime: compile, validate, targets (COMPILE) -------------------------------------
def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model exported by `frugalrt export`")
    p.add_argument("--target", required=True, help="target name (see `frugalrt targets`)")
    p.add_argument("--out", required=True, help="artifact directory to write atomically; an existing one is "
                   "replaced only if it is empty or a frugalrt artifact (never '.', the working directory or "
                   "a folder holding the model)")
    p.add_argument("--force", action="store_true", help="replace --out even if it is a non-empty directory "
                   "that frugalrt did not write")
    p.add_argument("--board", help="cortex-m4/cortex-m7: the board the bundle must fit (mps2-an386, mps2-an500, "
                   "netduinoplus2); its flash and RAM are checked now, and it is the bundle's default platform")
    p.add_argument("--batch-bound", type=ZERO_OR_MORE, metavar="N",
                   help="largest batch of a CPU/CUDA library, whose memory is then planned statically (default "
                        "4096, lowered for large activations; 0: any batch, allocated per call)")


@command("compile", "compile an ONNX model for a target into an artifact directory", _compile_args)
def _compile(args: argparse.Namespace) -> int:
    from frugalrt.targets.compile import compile as compile_model

    artifact = compile_model(args.model, args.target, args.out, force=args.force, board=args.board,
                             batch_bound=args.batch_bound,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {artifact.path} ({artifact.kind} for {artifact.target})")
    return 0


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact directory written by `frugalrt compile`")
    p.add_argument("--device", default="local",
                   help="local (default), cuda or cuda:N (NVIDIA GPU), rpc://HOST:PORT, tracker://HOST:PORT/KEY, qemu or qemu:BOARD, or a phone "
                        "or board with no TVM runtime: adb://SERIAL or ssh://USER@HOST[:PORT] (runs the artifact's "
                        "static runner there; options ?timeout=S&runner=runner-noneon, see docs/devices.md)")
    p.add_argument("--emulate", action="store_true", help="run under qemu (same as --device qemu:BOARD)")
    p.add_argument("--board", help="qemu board for --emulate (e.g. mps2-an386)")
    p.add_argument("--rtol", type=TOLERANCE, default=1e-4,
                   help="relative tolerance of float outputs (default %(default)g): each value must be within "
                        "atol + rtol*|ref| + 4*eps32*sqrt(K)*max|ref|, K the model's accumulation length (the "
                        "sum of its MatMul/Conv/Butterfly/binary reduction lengths), max|ref| the output's scale")
    p.add_argument("--atol", type=TOLERANCE, default=1e-5,
                   help="absolute tolerance of float outputs (default %(default)g), added to the float32 noise "
                        "floor above; integer outputs are compared exactly, NaN/inf as IEEE values")
    p.add_argument("--json", metavar="OUT.json", help="also write the report as JSON (per output: max abs/rel "
                   "error, tolerance, pass/fail)")


@command("validate", "run an artifact on golden vectors and compare with PyTorch's outputs", _validate_args)
def _validate(args: argparse.Namespace) -> int:
    from frugalrt._atomic import check_output
    from frugalrt.runtime.validate import validate

    device = (f"qemu:{args.board}" if args.board else "qemu") if args.emulate else args.device
    if args.json:
        check_output(args.json, inputs=[args.artifact], suffixes=(".json",))
    report = validate(args.artifact, device=device, rtol=args.rtol, atol=args.atol)
    print(report.table())
    _write_text(args.json, report.to_json(), args.artifact, lambda m: print(m, file=sys.stderr, flush=True))
    return 0 if report.passed else 1


@command("targets", "list compile targets and whether their tools are installed", lambda p: None)
def _targets(args: argparse.Namespace) -> int:
    from frugalrt.targets.registry import TARGETS

    rows = []
    for t in TARGETS.values():
        missing = set(t.missing_tools())
        needs = ", ".join(f"{tool}{' (missing)' if tool in missing else ''}" for tool in t.needs) or "-"
        rows.append((t.name, t.artifact, t.runner, needs, t.description))
    width = max(len("NEEDS"), *(len(r[3]) for r in rows)) + 2
    for row in [("TARGET", "ARTIFACT", "RUNS ON", "NEEDS", "DESCRIPTION"), *rows]:
        print(f"{row[0]:<15}{row[1]:<13}{row[2]:<13}{row[3]:<{width}}{row[4]}")
    return 0


# --- devices: emulated devices, RPC servers and trackers (DEVICES) ---------------------------------
def _device_args(p: argparse.ArgumentParser) -> None:
    from frugalrt.runtime.emulator import DEVICE_KINDS

    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("start", help="start a device; prints its address rpc://HOST:PORT")
    s.add_argument("kind", choices=list(DEVICE_KINDS),
                   help="; ".join(f"{k}: {d}" for k, (d, _) in DEVICE_KINDS.items()))
    s.add_argument("--port", type=PORT, help="port to listen on (default: a free one)")
    s.add_argument("--name", help="name for stop/list; an explicit name must not be in use "
                   "(default: the kind, numbered if taken)")
    s.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker")
    s.add_argument("--key", help="tracker key (default: the kind)")
    t = sub.add_parser("stop", help="stop devices started by frugalrt")
    t.add_argument("names", nargs="*", metavar="NAME")
    t.add_argument("--all", action="store_true", help="stop every device and tracker")
    sub.add_parser("list", help="show running devices and trackers")
    tr = sub.add_parser("tracker", help="start a TVM RPC tracker; prints tracker://HOST:PORT")
    tr.add_argument("tracker_action", choices=["start"])
    tr.add_argument("--port", type=PORT)


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
    p.add_argument("--device", default="local", help="local (default), cuda or cuda:N (NVIDIA GPU), rpc://HOST:PORT, tracker://HOST:PORT/KEY, "
                   "adb://SERIAL or ssh://USER@HOST[:PORT] (the static runner times itself there; docs/devices.md)")
    p.add_argument("--runs", type=COUNT, help="timed runs (default 100)")
    p.add_argument("--duration", type=POSITIVE, metavar="SECONDS", help="time runs for about this long "
                   "instead of a number of runs")
    p.add_argument("--warmup", type=ZERO_OR_MORE, default=10, help="untimed warm-up runs (default 10)")
    p.add_argument("--input", metavar="FILE", help="inputs: .npy (one-input models) or .npz with one array per "
                   "input name (default: the golden inputs recorded at export)")
    p.add_argument("--batch", type=COUNT, help="seeded random inputs with this batch instead of the golden ones")
    p.add_argument("--threads", type=COUNT, default=1, help="TVM runtime threads on the device (default 1)")
    p.add_argument("--baseline", metavar="MODEL.onnx", help="also compile and profile this model (e.g. the "
                   "dense equivalent) for the same target and print the ratio")
    p.add_argument("--json", metavar="OUT.json", help="write the report as JSON")
    p.add_argument("--csv", metavar="OUT.csv", help="write the per-op table as CSV")
    p.add_argument("--trace", metavar="OUT.json", help="write the per-op rounds as a Chrome/Perfetto trace "
                   "(chrome://tracing, ui.perfetto.dev)")
    p.add_argument("--plot", metavar="OUT.png", help="write a latency histogram and per-op bars (matplotlib)")
    p.add_argument("--devices", type=COUNT, default=1, help="with a tracker device: profile K devices in parallel")
    p.add_argument("--no-count", action="store_true", help="skip the instruction count on emulated devices")
    p.add_argument("--emulate", action="store_true", help="c-bundle/armv7 artifacts: instruction count under qemu")
    p.add_argument("--board", help="qemu board for --emulate (e.g. mps2-an386)")


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


@command("profile", "latency, per-op breakdown, footprint and instruction counts of an artifact", _profile_args)
def _profile(args: argparse.Namespace) -> int:
    import json

    from frugalrt._atomic import check_output
    from frugalrt.runtime import profile

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    outputs = {args.json: (".json",), args.plot: PLOT_SUFFIXES, args.csv: (".csv",), args.trace: (".json",)}
    for path, suffixes in outputs.items():  # refuse a bad output before the (long) run, not after it
        if path:
            check_output(path, inputs=[args.artifact], suffixes=suffixes)
    _check_profile_options(args)
    if args.plot:
        from frugalrt.runtime.profile_plot import require_matplotlib

        require_matplotlib()
    workload = profile.Workload(args.input, args.batch, args.threads, args.duration)
    runs = args.runs or 100
    if args.emulate:
        result = profile.profile_emulated(args.artifact, args.board, args.baseline, say)
        print(profile.emulated_table(result))
        _write_text(args.json, json.dumps(result, indent=1), args.artifact, say)
        return 0
    if args.devices > 1:
        reports = profile.profile_many(args.artifact, args.device, args.devices, runs, args.warmup, say, workload)
        print("\n\n".join(r.table() for r in reports))
        _write_text(args.json, json.dumps({"devices": [json.loads(r.to_json()) for r in reports]}, indent=1),
                    args.artifact, say)
        return 0
    report = profile.profile(args.artifact, args.device, runs, args.warmup, args.baseline, not args.no_count, say,
                             workload)
    print(report.table())
    _write_text(args.json, report.to_json(), args.artifact, say)
    _write_text(args.csv, report.csv(), args.artifact, say)
    _write_text(args.trace, report.trace(), args.artifact, say)
    if args.plot:
        from frugalrt.runtime.profile_plot import plot

        plot(report, args.plot)
        say(f"wrote {args.plot}")
    return 0


def _check_profile_options(args: argparse.Namespace) -> None:
    """Options that do not go together, refused before anything runs."""
    if args.runs and args.duration:
        raise FrugalError("--runs and --duration both say how long to time: pass one")
    if args.input and args.batch:
        raise FrugalError("--input and --batch both choose the inputs: pass one (the file's batch is its own)")
    if args.emulate and (args.plot or args.devices > 1 or args.csv or args.trace):
        raise FrugalError("--emulate reports instruction counts: --plot, --csv, --trace and --devices do not apply")
    if args.emulate and (args.input or args.batch or args.duration or args.threads != 1):
        raise FrugalError("--emulate counts one inference on the golden inputs: --input, --batch, --duration and "
                          "--threads do not apply")
    if args.devices > 1 and (args.plot or args.baseline or args.csv or args.trace):
        raise FrugalError("--devices profiles the artifact on several devices: drop --plot, --csv, --trace and "
                          "--baseline (profile the baseline with one device)")
    if args.input and not os.path.isfile(args.input):
        raise FrugalError(f"--input {args.input}: no such file")
    outputs = [os.path.abspath(p) for p in (args.json, args.csv, args.trace, args.plot) if p]
    if len(set(outputs)) < len(outputs):
        raise FrugalError("--json, --csv, --trace and --plot must name different files")


def _write_text(path: str | None, text: str, artifact: str, say: Callable[[str], None]) -> None:
    """Write ``text`` to ``path`` atomically (nothing when ``path`` is None)."""
    from frugalrt._atomic import atomic_path

    if path:
        with atomic_path(path, inputs=[artifact], suffixes=(os.path.splitext(path)[1] or ".txt",)) as tmp:
            tmp.write_text(text)
        say(f"wrote {path}")


# --- nn: compress dense layers to butterflies (PACBAYES) --------------------------------------------
def _compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="file.py:factory returning (model, example_inputs); the file may define "
                                  "finetune_data() and eval_data() returning labelled (x, y) tensors")
    p.add_argument("--layers", nargs="+", required=True, metavar="NAME",
                   help="names of nn.Linear layers to replace (as in model.named_modules(), e.g. 0 2 or fc1)")
    p.add_argument("--out", required=True, help="compressed model to write: .onnx (frugalrt export) or .pt2")
    p.add_argument("--finetune", type=ZERO_OR_MORE, default=0, metavar="EPOCHS",
                   help="fine-tune the compressed model for EPOCHS on finetune_data() (default 0)")
    p.add_argument("--lr", type=POSITIVE, default=1e-3, help="Adam learning rate for fine-tuning (default 1e-3)")


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
