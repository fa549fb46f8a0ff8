"""An aarch64 Python 3.11 + TVM runtime userland that runs under ``qemu-aarch64`` without root.

Why this shape: no debootstrap, binfmt_misc or chroot is needed. Debian arm64 packages are fetched
with ``apt-get download`` and unpacked with ``dpkg -x``; the aarch64 ``apache-tvm`` wheel is
installed by the *host* pip (``--platform manylinux_2_28_aarch64``), so nothing is compiled or
pip-installed under emulation. The result is cached under ``${XDG_CACHE_HOME:-~/.cache}/frugalrt/``;
set-up holds a file lock and publishes the folder by an atomic rename, so concurrent callers
(parallel tests, two ``device start``) build it once and never see a half-made userland.
"""
from __future__ import annotations

import contextlib
import fcntl
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from frugalrt._cache import cache_dir
from frugalrt.errors import DeviceError

TVM_VERSION = "0.27.0.post1"
PYTHON = "python3.11"
# python3.11-minimal, its stdlib and the shared libraries they link (checked with ldd under qemu).
DEBIAN_PACKAGES = (
    "python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 "
    "libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libcrypt1 libuuid1 libsqlite3-0 "
    "libncursesw6 libtinfo6 libreadline8 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 "
    "libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 libdb5.3"
).split()
# The device only needs the TVM runtime: the compiler library and sources are ~250 MB of dead weight.
_STRIP = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty", "tvm/src", "tvm/include")


@dataclass(frozen=True)
class Userland:
    """A ready aarch64 userland: ``root`` (sysroot for ``qemu-aarch64 -L``) and ``site`` (wheels)."""

    path: Path

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def site(self) -> Path:
        return self.path / "site"

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / PYTHON

    def command(self, *args: str, env: dict[str, str] | None = None) -> list[str]:
        """argv that runs the device Python under qemu-aarch64 as a Raspberry Pi 4's Cortex-A72
        (so code needing a newer core fails here as it would on the board); runtime-only TVM."""
        qemu = shutil.which("qemu-aarch64")
        if qemu is None:
            raise DeviceError("qemu-aarch64 not found: install Debian's qemu-user package")
        cmd = [qemu, "-cpu", "cortex-a72", "-L", str(self.root), "-E", f"PYTHONPATH={self.site}",
               "-E", "TVM_USE_RUNTIME_LIB=1", "-E", "PYTHONDONTWRITEBYTECODE=1"]
        for key, value in (env or {}).items():
            cmd += ["-E", f"{key}={value}"]
        return cmd + [str(self.python), *args]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (released by the kernel if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise DeviceError(f"aarch64 userland set-up failed while {what} ({' '.join(cmd[:4])} ...):\n"
                          f"{tail}\nCheck access to the Debian and PyPI package registries.")


def _build(dest: Path, log) -> None:
    debs, root, site = dest / "debs", dest / "root", dest / "site"
    for d in (debs, root, site):
        d.mkdir()
    log(f"downloading {len(DEBIAN_PACKAGES)} Debian arm64 packages")
    _run(["apt-get", "download", *(f"{p}:arm64" for p in DEBIAN_PACKAGES)], debs, "apt-get download")
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(root)], debs, f"unpacking {deb.name}")
    shutil.rmtree(debs)
    log(f"installing the aarch64 apache-tvm=={TVM_VERSION} wheel with the host pip")
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
          "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11",
          "--implementation", "cp", "--abi", "cp311", "--target", str(site),
          f"apache-tvm=={TVM_VERSION}"], dest, "pip install --platform manylinux_2_28_aarch64")
    for rel in _STRIP:
        p = site / rel
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if not (root / "usr" / "bin" / PYTHON).exists():
        raise DeviceError(f"aarch64 userland set-up: {PYTHON} missing after unpacking into {root}")
    # Bytecode is architecture-independent: compiling the stdlib with the host's 3.11 halves the
    # device's `import tvm` time under qemu (4.4 s -> 2.2 s). Best effort: only a 3.11 host can.
    if sys.version_info[:2] == (3, 11):
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                        str(root / "usr" / "lib" / PYTHON)], capture_output=True)


def ensure_userland(log=lambda msg: print(msg, file=sys.stderr)) -> Userland:
    """Return the cached userland, building it once (~15 s + ~120 MB of downloads) if needed."""
    final = cache_dir() / "emulator" / f"aarch64-py311-tvm{TVM_VERSION}"
    if (final / "root").is_dir():
        return Userland(final)
    with file_lock(final.parent / ".setup.lock"):
        if (final / "root").is_dir():  # built by another process while we waited
            return Userland(final)
        log(f"setting up the aarch64 userland in {final} (once)")
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
        try:
            _build(tmp, log)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Userland(final)
