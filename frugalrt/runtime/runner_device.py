"""``adb://SERIAL`` and ``ssh://[user@]host[:port]`` devices: the artifact's static runner, run there.

Opening a session makes a private directory on the device and pushes the runner into it; a call
pushes the inputs, runs the runner and pulls its outputs; :meth:`RunnerSession.profile_report`
runs its benchmark and maps the JSON it writes to a :class:`ProfileReport`; ``close`` removes the
directory. Every step is bounded (:mod:`frugalrt.runtime.transports`); a runner that exits
nonzero raises :class:`DeviceError` with its exit status and the tail of its output. No TVM
runtime, Python or C library is needed on the device: the runner is statically linked.
"""
from __future__ import annotations

import json
import secrets
import shlex
import tempfile
from pathlib import Path

import numpy as np

from frugalrt.errors import ArtifactError, DeviceError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.devices import register_device
from frugalrt.runtime.transports import DeviceUrl, Transport, open_transport

RESULT, INPUTS, OUTPUTS = "result.json", "in.bin", "out.bin"
SIGILL_STATUS = 128 + 4  # the shell's status of a process killed by SIGILL
NO_NEON = "runner-noneon"
BUILT_IN_INPUTS = ("golden", "zeros")  # what the runner times when it is given no input file


def runner_file(artifact: Artifact, name: str) -> Path:
    """The artifact's runner ``name`` (``runner``, ``runner-noneon``), or ArtifactError saying why there is none."""
    files = artifact.manifest.get("files", {})
    if name in files:
        return artifact.path / files[name]
    skipped = artifact.manifest.get("runner_skipped")
    built = [r["file"] for r in artifact.manifest.get("runners", [])]
    why = (f"this model has no static runner ({skipped})" if skipped else
           f"it has {', '.join(built)}" if built else
           f"target {artifact.target} has no static runner (ARM targets have one; recompile with this frugalrt)")
    raise ArtifactError(f"{artifact.path}: no {name!r} to run on an adb/ssh device: {why}")


class RunnerSession:
    """Callable session: ``session(*inputs) -> outputs``, one runner execution on the device per call."""

    def __init__(self, artifact: Artifact, device: str):
        self.artifact, self.device = artifact, device
        self.address = DeviceUrl.parse(device)
        runner = runner_file(artifact, self.address.runner)
        artifact.verify()  # never push a truncated or edited runner
        self.transport: Transport = open_transport(self.address)
        self.dir = f"{self.address.workdir.rstrip('/')}/frugalrt-{secrets.token_hex(6)}"
        self.transport.check(f"mkdir -p {shlex.quote(self.dir)}", f"making {self.dir}")
        self._opened = True
        try:
            self.transport.push(str(runner), self._remote("runner"))
            self.transport.check(f"chmod 755 {shlex.quote(self._remote('runner'))}", "chmod of the runner")
        except BaseException:
            self.close()
            raise

    def _remote(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def run(self, *args: str, extra_seconds: float = 0.0) -> dict:
        """Run the runner with ``args`` and the result JSON's path; the parsed JSON it wrote."""
        command = " ".join(shlex.quote(a) for a in [self._remote("runner"), *args, "--json", self._remote(RESULT)])
        rc, output = self.transport.shell(command, self.address.timeout + extra_seconds)
        if rc not in (0, 1):  # 1: ran, but the golden check failed (reported, not an error here)
            hint = (f"; the device's CPU lacks an instruction this build uses: try ?runner={NO_NEON}"
                    if rc == SIGILL_STATUS and self.address.runner != NO_NEON
                    and NO_NEON in self.artifact.manifest.get("files", {}) else "")
            raise DeviceError(f"device {self.device}: the runner exited with status {rc}: "
                              f"{' '.join(output.strip().splitlines()[-3:])[-500:] or 'no output'}{hint}")
        with tempfile.TemporaryDirectory(prefix="frugalrt-runner-") as tmp:
            local = Path(tmp) / RESULT
            self.transport.pull(self._remote(RESULT), str(local))
            try:
                return json.loads(local.read_text())
            except ValueError as e:
                raise DeviceError(f"device {self.device}: the runner's JSON is unreadable ({e})") from None

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        shapes = [o["shape"][1:] for o in self.artifact.outputs]
        n, remote_inputs = self._push_inputs(inputs)
        self.run("--input", remote_inputs, "--output", self._remote(OUTPUTS), "--warmup", "0", "--runs", "0",
                 "--op-runs", "0")
        with tempfile.TemporaryDirectory(prefix="frugalrt-runner-") as tmp:
            self.transport.pull(self._remote(OUTPUTS), str(Path(tmp) / OUTPUTS))
            flat = np.fromfile(Path(tmp) / OUTPUTS, dtype=np.float32)
        sizes = [int(np.prod(s)) for s in shapes]
        if flat.size != n * sum(sizes):
            raise DeviceError(f"device {self.device}: the runner wrote {flat.size} floats, expected {n * sum(sizes)}")
        rows, bounds = flat.reshape(n, -1), np.cumsum([0, *sizes])
        return [rows[:, a:b].reshape(n, *s).copy() for a, b, s in zip(bounds, bounds[1:], shapes)]

    def profile_report(self, runs: int, warmup: int, op_runs: int = 10, duration: float | None = None,
                       inputs: list[np.ndarray] | None = None, input_label: str = "golden"):
        """Run the runner's benchmark on the device (``duration``: seconds of timed runs instead of
        ``runs``; ``inputs`` other than the golden ones it carries: timed on their first sample) as a
        ProfileReport; with its own inputs the runner also checks its outputs against the golden ones."""
        from frugalrt.runtime.runner_report import profile_report

        args = ["--runs", str(runs), "--warmup", str(warmup), "--op-runs", str(op_runs)]
        if duration is not None:
            args += ["--seconds", repr(float(duration))]
        if inputs is not None and input_label not in BUILT_IN_INPUTS:
            args += ["--input", self._push_inputs(inputs)[1]]
        result = self.run(*args, extra_seconds=duration or 0.0)
        return profile_report(result, self.artifact, self.device, self.address, input_label)

    def _push_inputs(self, inputs) -> tuple[int, str]:
        """Push ``inputs`` (checked against the artifact) as the runner's input file: (samples, remote path)."""
        from frugalrt.targets.cbundle import write_inputs

        self.artifact.check_inputs(inputs)
        with tempfile.TemporaryDirectory(prefix="frugalrt-runner-") as tmp:
            n = write_inputs(Path(tmp) / INPUTS, list(inputs))
            self.transport.push(str(Path(tmp) / INPUTS), self._remote(INPUTS))
        return n, self._remote(INPUTS)

    def close(self) -> None:
        """Remove the device's working directory (best effort: it never hides the error that closed us)."""
        if getattr(self, "_opened", False):
            self._opened = False
            try:
                self.transport.shell(f"rm -rf {shlex.quote(self.dir)}")
            except DeviceError:
                pass


def open_runner(artifact: Artifact, device: str) -> RunnerSession:
    return RunnerSession(artifact, device)


register_device("adb", open_runner)
register_device("ssh", open_runner)
