#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a local venv with CPU-only torch and frugalrt (editable),
# plus the Debian cross compilers and qemu used by the compile and emulated tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.frugalrt-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing Python packages (CPU-only torch)"
  # (filter the local-index noise this machine's pip config prints; real errors still show)
  quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
  quiet "$VENV/bin/pip" install -q torch==2.13.0
  quiet "$VENV/bin/pip" install -q -e '.[dev]'
  touch "$stamp"
fi

# gcc-arm-linux-gnueabi (armel glibc, ARMv5TE code): the Pi Zero's static runner (Debian's armhf glibc is ARMv7);
# openssh-server: the tests' ssh:// device, an sshd on 127.0.0.1 with its own config and keys.
DEBS="qemu-user qemu-system-arm gcc-aarch64-linux-gnu g++-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-armhf-cross gcc-arm-linux-gnueabi libc6-dev-armel-cross gcc-arm-none-eabi libnewlib-arm-none-eabi openssh-server file"
missing=""
for tool in qemu-aarch64 qemu-arm qemu-system-arm aarch64-linux-gnu-g++ arm-linux-gnueabihf-gcc arm-linux-gnueabi-gcc arm-none-eabi-gcc file; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[ -f /usr/lib/arm-none-eabi/newlib/libc.a ] || [ -f /usr/lib/arm-none-eabi/lib/libc.a ] || missing="$missing newlib"
[ -f /usr/arm-linux-gnueabihf/include/stdio.h ] || missing="$missing armhf-libc"
[ -f /usr/arm-linux-gnueabi/lib/libc.a ] || missing="$missing armel-libc"
[ -x /usr/sbin/sshd ] || missing="$missing sshd"
# The emulated Raspberry Pi's userland is made of Debian arm64 packages (apt-get download).
apt-cache show python3.11-minimal:arm64 >/dev/null 2>&1 || missing="$missing arm64-package-lists"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages for:$missing"
    dpkg --add-architecture arm64 2>/dev/null || true
    apt-get update -q >/dev/null || echo "[setup] apt-get update reported errors; trying the install anyway"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $DEBS >/dev/null
  else
    echo "[setup] WARNING: missing$missing; as root run: dpkg --add-architecture arm64 && apt-get update && apt-get install --no-install-recommends $DEBS (the compile and emulated test tiers need them)" >&2
  fi
fi
# sshd run as root (the tests' ssh:// device) needs its privilege separation directory, which a
# container without systemd never creates.
if [ "$(id -u)" = 0 ] && [ -x /usr/sbin/sshd ] && [ ! -d /run/sshd ]; then
  mkdir -p -m 0755 /run/sshd
fi
echo "[setup] ready: $VENV/bin/frugalrt"
