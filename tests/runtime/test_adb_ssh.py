"""``adb://`` and ``ssh://`` devices (emulated tier): compiled artifacts' static runners pushed, run, pulled.

No phone or Pi is needed: the "device" is this machine with ARM executables run under qemu-user
(``fake_device.py``). ``adb`` is a fake on PATH whose push/shell/pull map to a temporary folder;
``ssh`` is the real OpenSSH client talking to a real sshd on 127.0.0.1 (own config, host key and
authorized_keys in a temporary folder; its forced command is the fake device's shell), or, where
no sshd can run without root-only changes, a fake ssh client on PATH. What is real: the transports'
commands, timeouts and errors, the runners and their numbers; what is not: the device's kernel
and CPU (qemu-user) and, for adb, the adb server.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from frugalrt.errors import ArtifactError, DeviceError

pytestmark = [pytest.mark.compile, pytest.mark.emulated]
FAKE_DEVICE = Path(__file__).with_name("fake_device.py")
SERIAL = "FAKE0123"
QEMU = {"arm": ["qemu-arm", "-cpu", "cortex-a9"], "aarch64": ["qemu-aarch64", "-cpu", "cortex-a57"]}


@pytest.fixture(scope="module")
def artifacts(digits_onnx, tmp_path_factory, need_tools):
    """The digits example compiled for an old 64-bit phone, an old 32-bit phone and a Pi Zero."""
    import frugalrt

    need_tools("aarch64-linux-gnu-gcc", "arm-linux-gnueabihf-gcc", "arm-linux-gnueabi-gcc", "qemu-arm",
               "qemu-aarch64", why="static runners on adb/ssh devices")
    out = tmp_path_factory.mktemp("device-artifacts")
    return {t: frugalrt.compile(digits_onnx, t, out / t) for t in ("android-arm64", "android-armv7", "rpi-zero")}


def write_device(path: Path, root: str, qemu: dict, delay: float = 0) -> Path:
    path.write_text(json.dumps({"serial": SERIAL, "root": root, "qemu": qemu, "delay": delay}))
    return path


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    """A fake adb on PATH; returns the device config (rewrite it to change the device)."""
    bin_dir, root = tmp_path / "bin", tmp_path / "phone"
    bin_dir.mkdir()
    (root / "data" / "local" / "tmp").mkdir(parents=True)
    config = write_device(tmp_path / "phone.json", str(root), QEMU)
    (bin_dir / "adb").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_DEVICE}" adb "{config}" "$@"\n')
    (bin_dir / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sshd_problem() -> str | None:
    if not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"):
        return "no sshd (Debian: openssh-server)"
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        return "sshd as root needs /run/sshd (scripts/setup.sh creates it)"
    return None


@pytest.fixture(scope="module")
def ssh_device(tmp_path_factory):
    """``ssh://USER@127.0.0.1:PORT`` of a Pi Zero-like device (ARM1176 under qemu-arm), its config and kind."""
    tmp = tmp_path_factory.mktemp("ssh")
    config = write_device(tmp / "pi.json", "", {**QEMU, "arm": ["qemu-arm", "-cpu", "arm1176"]})
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    workdir = tmp / "home"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        problem = _sshd_problem()
        if problem is None:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key")], check=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "client_key")], check=True)
            forced = f'command="{sys.executable} {FAKE_DEVICE} ssh-command {config}",no-pty,no-port-forwarding'
            (tmp / "authorized_keys").write_text(f"{forced} {(tmp / 'client_key.pub').read_text()}")
            port = _free_port()
            (tmp / "sshd_config").write_text("\n".join([
                f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {tmp / 'host_key'}", f"PidFile {tmp / 'sshd.pid'}",
                f"AuthorizedKeysFile {tmp / 'authorized_keys'}", "StrictModes no", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "PubkeyAuthentication yes", f"AllowUsers {user}", ""]))
            (tmp / "ssh_config").write_text("\n".join([
                "Host *", f"  IdentityFile {tmp / 'client_key'}", "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {tmp / 'known_hosts'}", "  StrictHostKeyChecking accept-new",
                "  LogLevel ERROR", ""]))
            sshd = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f",
                                     str(tmp / "sshd_config")], stderr=open(tmp / "sshd.log", "w"))
            mp.setenv("FRUGALRT_SSH_OPTIONS", f"-F {tmp / 'ssh_config'}")
            for _ in range(100):  # ready when it accepts connections (~0.1 s)
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.05)
            kind = "sshd"
        else:
            sshd, port, kind = None, 22, f"fake ssh client ({problem})"
            (tmp / "bin").mkdir()
            (tmp / "bin" / "ssh").write_text(
                f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_DEVICE}" ssh "{config}" "$@"\n')
            (tmp / "bin" / "ssh").chmod(0o755)
            mp.setenv("PATH", f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}")
        try:
            yield {"url": f"ssh://{user}@127.0.0.1:{port}?dir={workdir}&emulated=1", "config": config,
                   "workdir": workdir, "kind": kind}
        finally:
            if sshd is not None:
                sshd.terminate()
                sshd.wait(10)


def _profile_cli(artifact, device: str, out: Path) -> dict:
    """The JSON report of ``frugalrt profile``, with its CSV rows and trace events under "csv" and "trace"."""
    import csv

    from frugalrt.cli import main

    table, trace = out.with_suffix(".csv"), out.with_name("trace.json")
    assert main(["profile", str(artifact.path), "--device", device, "--runs", "30", "--warmup", "3",
                 "--json", str(out), "--csv", str(table), "--trace", str(trace)]) == 0
    return {**json.loads(out.read_text()), "csv": list(csv.DictReader(table.open())),
            "trace": json.loads(trace.read_text())["traceEvents"]}


def _check_named_ops_and_trace(report: dict, artifact) -> None:
    """Rows named by the model's ONNX nodes (types from its graph; each Butterfly and BinaryGemm node
    once), the CSV the same rows, and the trace one event per row and per-op run, lasting that run."""
    import onnx

    types = {n.name: n.op_type for n in onnx.load(str(artifact.onnx_path)).graph.node}
    ops = report["ops"]
    for o in ops:
        names = o["name"].split("+")
        assert all(n in types for n in names) and o["op_type"] == "+".join(dict.fromkeys(types[n] for n in names)), o
    frugal = sorted(n for n, t in types.items() if t in ("Butterfly", "BinaryGemm"))
    assert frugal and sorted(n for o in ops for n in o["name"].split("+") if n in frugal) == frugal
    assert [(r["name"], r["op_type"], r["kernel"]) for r in report["csv"]] == \
        [(o["name"], o["op_type"], o["kernel"]) for o in ops]
    runs = {len(o["samples_ms"]) for o in ops}
    assert len(runs) == 1 and runs.pop() > 0 and len(report["trace"]) == len(ops) * len(ops[0]["samples_ms"])
    by_order = {o["order"]: o for o in ops}
    for e in report["trace"]:
        o = by_order[e["args"]["order"]]
        assert e["ph"] == "X" and e["name"] == o["name"] and e["cat"] == o["op_type"]
        assert e["dur"] == pytest.approx(o["samples_ms"][e["args"]["round"]] * 1e3, abs=1e-3)


def _check_profile(report: dict, artifact, device: str, machine: str) -> None:
    lat = report["latency_ms"]
    assert report["device"] == device and report["target"] == artifact.target and report["runs"] == 30
    assert len(report["samples_ms"]) == 30 and 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["max"]
    assert report["device_info"]["machine"] == machine and report["device_info"]["emulated"] is True
    ops = report["ops"]
    assert ops and all(o["ms"] >= 0 and o["calls"] >= 1 for o in ops)
    assert sum(o["ms"] for o in ops) == pytest.approx(report["ops_sum_ms"]) and report["inputs"] == "golden"
    assert any("golden check on the device: passed" in n for n in report["notes"])
    assert report["workspace_bytes"] > 0 and report["param_bytes"] == artifact.manifest["param_bytes"]
    _check_named_ops_and_trace(report, artifact)


@pytest.mark.parametrize("target,machine", [("android-arm64", "aarch64"), ("android-armv7", "armv7l")])
def test_validate_and_profile_over_adb(artifacts, fake_adb, target, machine, tmp_path, capsys):
    import frugalrt
    from frugalrt.cli import main

    art = artifacts[target]
    runners = {r["file"] for r in art.manifest["runners"]}
    assert runners == ({"runner", "runner-noneon"} if target == "android-armv7" else {"runner"})
    assert runners <= set(art.manifest["files"]) and runners <= set(art.manifest["sha256"])
    device = f"adb://{SERIAL}?emulated=1"
    report = frugalrt.validate(art.path, device=device)
    assert report.passed and report.reference == "golden", report.table()
    assert all(o.max_abs < 1e-4 and o.argmax_agreement == 1.0 for o in report.outputs)
    golden_in, golden_out = art.golden()
    session = frugalrt.load(art.path, device=device)
    (y,) = session(*golden_in)
    session.close()
    np.testing.assert_allclose(y, golden_out[0], rtol=1e-4, atol=1e-4)
    assert main(["validate", str(art.path), "--device", device]) == 0
    assert "PASSED" in capsys.readouterr().out
    _check_profile(_profile_cli(art, device, tmp_path / "p.json"), art, device, machine)
    phone_tmp = Path(json.loads(fake_adb.read_text())["root"]) / "data" / "local" / "tmp"
    assert list(phone_tmp.iterdir()) == []  # every session removed its directory


def test_validate_and_profile_over_ssh_on_a_pi_zero(artifacts, ssh_device, tmp_path):
    import frugalrt

    art = artifacts["rpi-zero"]
    print(f"\nssh device: {ssh_device['kind']}")
    report = frugalrt.validate(art.path, device=ssh_device["url"])
    assert report.passed, report.table()
    _check_profile(_profile_cli(art, ssh_device["url"], tmp_path / "p.json"), art, ssh_device["url"], "armv6l")
    assert list(ssh_device["workdir"].iterdir()) == []


def test_old_phone_without_neon_gets_a_clear_error_then_runs_runner_noneon(artifacts, fake_adb):
    import frugalrt

    no_neon = {**QEMU, "arm": ["qemu-arm", "-cpu", "cortex-r5f"]}  # an ARMv7 core without NEON
    write_device(fake_adb, json.loads(fake_adb.read_text())["root"], no_neon)
    art = artifacts["android-armv7"]
    with pytest.raises(DeviceError, match=r"runner exited with status 132: .*try \?runner=runner-noneon"):
        frugalrt.validate(art.path, device=f"adb://{SERIAL}")
    assert frugalrt.validate(art.path, device=f"adb://{SERIAL}?runner=runner-noneon").passed


@pytest.mark.parametrize("device,message", [
    ("adb://", "bad device 'adb://': expected adb://SERIAL"),
    ("adb://X?speed=9", "unknown option 'speed'"),
    ("adb://X?timeout=-1", "timeout must be a positive number"),
    ("ssh://pi@host:port", "the port must be a number"),
    ("ssh://", "bad device 'ssh://'"),
])
def test_bad_device_urls_are_one_line_errors(artifacts, device, message):
    import frugalrt

    with pytest.raises(DeviceError, match=message.replace("?", r"\?")):
        frugalrt.validate(artifacts["android-arm64"].path, device=device)


def test_missing_tool_unknown_serial_timeout_and_no_runner(artifacts, fake_adb, tmp_path, monkeypatch):
    import frugalrt

    no_runner = tmp_path / "x86"  # what an artifact of a target with no runner records (host, cortex-m4...)
    shutil.copytree(artifacts["android-arm64"].path, no_runner)
    manifest = json.loads((no_runner / "manifest.json").read_text())
    manifest.update(target="host", runners=[])
    del manifest["files"]["runner"]
    (no_runner / "manifest.json").write_text(json.dumps(manifest))

    art = artifacts["android-arm64"].path
    with pytest.raises(DeviceError, match="adb does not see a ready device 'NOPE'"):
        frugalrt.validate(art, device="adb://NOPE")
    write_device(fake_adb, json.loads(fake_adb.read_text())["root"], QEMU, delay=5)
    start = time.perf_counter()
    with pytest.raises(DeviceError, match=r"adb shell timed out after 1 s \(raise it with \?timeout=SECONDS\)"):
        frugalrt.validate(art, device=f"adb://{SERIAL}?timeout=1")
    assert time.perf_counter() - start < 4
    with pytest.raises(ArtifactError, match="no 'runner' to run on an adb/ssh device: target host has no static"):
        frugalrt.validate(no_runner, device=f"adb://{SERIAL}")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(DeviceError, match="the adb tool is not on PATH; install Android platform-tools"):
        frugalrt.validate(art, device=f"adb://{SERIAL}")
