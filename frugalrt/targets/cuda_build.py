"""A loadable CUDA ``lib.so``: the Relax executable with its kernels embedded as an nvcc fatbin.

TVM's wheel compiles CUDA to a binary only when its CUDA runtime (``libtvm_runtime_cuda.so``,
which needs the NVIDIA driver) is loaded; on a build machine without a driver it keeps the CUDA
*source* (module format ``"cuda"``), which the runtime would compile at load time with NVRTC or
nvcc, and TVM's nvcc path adds ``--use_fast_math`` (flush-to-zero, approximate division: not the
float32 of docs/ops.md). So frugalrt compiles that source itself, ahead of time, with nvcc for the
target's architectures (a cubin each, plus PTX of the oldest for newer GPUs), IEEE float32
(no fast math), and rewrites the CUDA entry of the library blob TVM serializes (the ``"cuda"``
module's fields: format, function table, data) to format ``"fatbin"`` with that binary.
:func:`embedded_cuda` and :func:`fatbin_entries` read it back (tests).
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from frugalrt.errors import TargetError

# target -> (SASS architectures, PTX architecture embedded for GPUs newer than all of them)
CUDA_ARCHS: dict[str, tuple[tuple[str, ...], str]] = {
    "cuda": (("sm_75", "sm_80", "sm_86", "sm_89", "sm_90"), "sm_75"),
    "cuda-sm90": (("sm_90",), "sm_90"),
    "jetson-orin": (("sm_87",), "sm_87"),
}
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__")
BLOB_SYMBOL = "__tvm_ffi__library_bin"
_LIB_KEY = "_lib"


def cuda_source(module) -> str:
    """The CUDA C source of every kernel of a built Relax executable (or runtime module) for a CUDA target."""
    sources = [m.inspect_source() for m in _modules(getattr(module, "mod", module)) if m.kind == "cuda"]
    if not sources:
        raise TargetError("the CUDA build produced no CUDA module")
    return "\n".join(sources)


def _modules(module):
    yield module
    for imported in module.imports:
        yield from _modules(imported)


def gencode_flags(target: str) -> list[str]:
    """nvcc ``-gencode`` flags of ``target``: SASS for each arch, PTX for the oldest."""
    archs, ptx = CUDA_ARCHS[target]
    flags = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{ptx[3:]},code=compute_{ptx[3:]}"]


def compile_fatbin(source: str, target: str) -> bytes:
    """``source`` compiled by nvcc into one fatbin for ``target``'s architectures (IEEE float32)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise TargetError(f"target {target} needs nvcc (CUDA toolkit 12.x or 13.x) to compile its kernels; "
                          "install the CUDA toolkit or `pip install nvidia-cuda-nvcc` and put nvcc on PATH")
    with tempfile.TemporaryDirectory(prefix="frugalrt-nvcc-") as tmp:
        src, out = Path(tmp, "kernels.cu"), Path(tmp, "kernels.fatbin")
        src.write_text(source)
        run = subprocess.run([nvcc, "--fatbin", *NVCC_FLAGS, *gencode_flags(target), "-o", str(out), str(src)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise TargetError(f"nvcc could not compile the CUDA kernels of target {target}:\n{run.stderr[-2000:]}")
        return out.read_bytes()


# --- the serialized module blob (tvm_ffi's library binary) ---------------------------------------
# u64 size of the rest | import tree: u64 n + n u64 row pointers, u64 m + m u64 child indices |
# per module, in tree order: str key, then (key != "_lib") u64 size + the module's bytes.
# A CUDA module's bytes: str format | function table | str data (source for "cuda", else binary).
# A str is u64 length + bytes.

def _u64(data: bytes, at: int) -> int:
    return struct.unpack_from("<Q", data, at)[0]


def _str(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def _entries(blob: bytes):
    """(header bytes up to the first module, [(key, payload or None)]) of a library blob."""
    at = 8
    for _ in range(2):  # row pointers, child indices
        at += 8 + 8 * _u64(blob, at)
    header, entries = blob[8:at], []
    while at < len(blob):
        n = _u64(blob, at)
        key = blob[at + 8:at + 8 + n].decode()
        at += 8 + n
        if key == _LIB_KEY:
            entries.append((key, None))
            continue
        size = _u64(blob, at)
        entries.append((key, blob[at + 8:at + 8 + size]))
        at += 8 + size
    if at != len(blob):
        raise TargetError("unexpected TVM library blob layout (frugalrt supports apache-tvm 0.27)")
    return header, entries


def _split_cuda(payload: bytes) -> tuple[str, bytes, bytes]:
    """(format, function table bytes, data) of a serialized CUDA module."""
    n = _u64(payload, 0)
    fmt = payload[8:8 + n].decode()
    # the data is the last field: find the length prefix that spans exactly to the end
    for at in range(8 + n, len(payload) - 7):
        if _u64(payload, at) == len(payload) - at - 8:
            return fmt, payload[8 + n:at], payload[at + 8:]
    raise TargetError("unexpected layout of TVM's serialized CUDA module (frugalrt supports apache-tvm 0.27)")


def embed_fatbin(blob: bytes, source: str, fatbin: bytes) -> bytes:
    """``blob`` with its CUDA module's source (format ``cuda``) replaced by ``fatbin`` (format ``fatbin``)."""
    header, entries = _entries(blob)
    body, replaced = [], 0
    for key, payload in entries:
        body.append(_str(key.encode()))
        if payload is None:
            continue
        if key == "cuda":
            fmt, table, data = _split_cuda(payload)
            if fmt != "cuda" or data.decode(errors="replace") != source:
                raise TargetError(f"TVM's CUDA module holds format {fmt!r}, not the CUDA source frugalrt compiled")
            payload = _str(b"fatbin") + table + _str(fatbin)
            replaced += 1
        body.append(struct.pack("<Q", len(payload)) + payload)
    if replaced != 1:
        raise TargetError(f"expected one CUDA module in the built library, found {replaced}")
    rest = header + b"".join(body)
    return struct.pack("<Q", len(rest)) + rest


def embedded_cuda(lib: str | os.PathLike) -> tuple[str, bytes]:
    """(format, data) of the CUDA module embedded in a ``lib.so`` (a 64-bit little-endian ELF)."""
    data = Path(lib).read_bytes()
    at = _symbol_offset(data, BLOB_SYMBOL)
    _, entries = _entries(data[at:at + 8 + _u64(data, at)])
    for key, payload in entries:
        if key == "cuda":
            fmt, _, body = _split_cuda(payload)
            return fmt, body
    raise TargetError(f"{lib}: no embedded CUDA module")


def _symbol_offset(elf: bytes, name: str) -> int:
    """File offset of the dynamic symbol ``name`` of an ELF64 little-endian shared library."""
    if elf[:6] != b"\x7fELF\x02\x01":
        raise TargetError("not a 64-bit little-endian ELF library")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    for sh_type, link, offset, size, entsize in ((s[1], s[6], s[4], s[5], s[9]) for s in sections):
        if sh_type != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize):
            st_name, _, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", elf, at)
            end = elf.index(b"\0", strtab + st_name)
            if elf[strtab + st_name:end].decode() == name and 0 < shndx < shnum:
                return value - sections[shndx][3] + sections[shndx][4]
    raise TargetError(f"no symbol {name} in the library")


def fatbin_entries(fatbin: bytes) -> list[tuple[str, str]]:
    """[(``"sass"`` or ``"ptx"``, ``"sm_XY"``)] of an nvcc fatbin (its entry headers: kind, size, arch)."""
    magic, _, header, size = struct.unpack_from("<IHHQ", fatbin, 0)
    if magic != 0xBA55ED50:
        raise TargetError("not an nvcc fatbin")
    entries, at = [], header
    while at < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, at)
        arch, = struct.unpack_from("<I", fatbin, at + 28)
        entries.append(({1: "ptx", 2: "sass"}.get(kind, str(kind)), f"sm_{arch}"))
        at += entry_header + payload
    return entries


def pack_imports_with_fatbin(source: str, fatbin: bytes):
    """An ``export_library(fpack_imports=...)`` hook: TVM's import blob with the fatbin embedded,
    as an assembler file that includes it with ``.incbin`` (fast at any size, unlike a C array)."""

    def pack(module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        from tvm.runtime import _ffi_api

        if is_system_lib or prefix:
            raise TargetError("CUDA artifacts are shared libraries, not system libraries")
        blob = embed_fatbin(bytes(_ffi_api.ModulePackImportsToTensor(module).numpy()), source, fatbin)
        data = Path(workspace_dir, "devc.bin")
        data.write_bytes(blob)
        asm = Path(workspace_dir, "devc.S")
        asm.write_text(f"""    .section .rodata
    .balign 16
    .globl {BLOB_SYMBOL}
    .type {BLOB_SYMBOL}, %object
{BLOB_SYMBOL}:
    .incbin "{data}"
    .size {BLOB_SYMBOL}, {len(blob)}
    .section .note.GNU-stack,"",%progbits
""")
        return str(asm)

    return pack
