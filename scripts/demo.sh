#!/usr/bin/env bash
# The main job end to end on the embedded example (scikit-learn digits, nothing downloaded):
# train + export -> compile for host, a Raspberry Pi 4 and a Cortex-M4 -> validate against PyTorch
# -> profile on an emulated Pi 4 over TVM RPC against the dense model.
set -euo pipefail
cd "$(dirname "$0")/.."
FRT=${FRT:-.venv/bin/frugalrt}
OUT=${OUT:-build/demo}
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "export the frugal example and its dense twin"
$FRT export examples/digits_frugal.py:build --out "$OUT/digits.onnx"
$FRT export examples/digits_frugal.py:build_dense --out "$OUT/dense.onnx"

step "compile and validate on this machine"
$FRT compile "$OUT/digits.onnx" --target host --out "$OUT/host"
$FRT validate "$OUT/host"

step "Raspberry Pi 4 (emulated aarch64 device over TVM RPC)"
$FRT compile "$OUT/digits.onnx" --target rpi4 --out "$OUT/rpi4"
trap '$FRT device stop demo-rpi4 >/dev/null 2>&1 || true' EXIT
$FRT device stop demo-rpi4 >/dev/null 2>&1 || true  # a device left by a killed earlier demo
addr=$($FRT device start rpi4-emu --name demo-rpi4 | tail -n 1)
$FRT validate "$OUT/rpi4" --device "$addr"
$FRT profile "$OUT/rpi4" --device "$addr" --baseline "$OUT/dense.onnx" --runs 20 --json "$OUT/rpi4-profile.json"

step "Cortex-M4 bundle on an emulated STM32F405 (netduinoplus2)"
$FRT compile "$OUT/digits.onnx" --target cortex-m4 --out "$OUT/m4"
$FRT validate "$OUT/m4" --emulate --board netduinoplus2
$FRT profile "$OUT/m4" --emulate --board netduinoplus2 --baseline "$OUT/dense.onnx"

step "done: artifacts in $OUT"
