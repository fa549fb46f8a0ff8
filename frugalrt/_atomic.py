"""Atomic, non-destructive outputs.

Every file or directory frugalrt writes goes through :func:`atomic_path`: the output is built in a
temporary sibling and renamed into place, so a failure (an exception, Ctrl-C or SIGTERM, which the
CLI turns into an exception) leaves neither a partial output nor the temporary behind. Before
anything is written, :func:`check_output` refuses to replace what frugalrt did not write: the
working directory or a folder above it, the inputs or a folder holding them, a regular file where
a directory goes (and the reverse), and a non-empty directory that is not a frugalrt artifact.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from frugalrt.errors import OutputError

ARTIFACT_MANIFEST = "manifest.json"


def is_frugalrt_dir(path: Path) -> bool:
    """Whether ``path`` is a directory that ``frugalrt compile`` wrote (its manifest says so)."""
    try:
        return "frugalrt_version" in json.loads((path / ARTIFACT_MANIFEST).read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_output(path: str | os.PathLike, is_dir: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 force: bool = False, suffixes: tuple[str, ...] = ()) -> Path:
    """The absolute output path, or :class:`OutputError` when writing it could destroy another's data.

    ``inputs``: files the command reads (never replaced, nor a folder holding them). ``force`` lets a
    non-empty, non-frugalrt directory (or an existing file whose suffix is not in ``suffixes``) be
    replaced; the working directory, the inputs and a file/directory mismatch are refused regardless.
    """
    shown = str(path)
    if not shown or os.path.basename(os.path.normpath(shown)) in ("", ".", ".."):
        raise OutputError(f"--out {shown!r}: name a new {'directory' if is_dir else 'file'} (not '.', '..' or /)")
    out = Path(path).resolve()
    if Path.cwd().resolve().is_relative_to(out):
        raise OutputError(f"--out {shown}: is the working directory or a folder above it; name a new "
                          f"{'directory' if is_dir else 'file'}")
    for source in inputs:
        source = Path(source).resolve()
        if source.is_relative_to(out):
            raise OutputError(f"--out {shown}: {'is' if source == out else 'contains'} the input {source}; "
                              "name another output")
    if not out.exists() and not out.is_symlink():
        return out
    if is_dir:
        if not out.is_dir():
            raise OutputError(f"--out {shown}: is a file, not a directory; name a new directory")
        if not (force or is_frugalrt_dir(out) or not any(out.iterdir())):
            raise OutputError(f"--out {shown}: is a non-empty directory that is not a frugalrt artifact "
                              f"(no {ARTIFACT_MANIFEST} written by frugalrt); name a new directory or pass --force")
    else:
        if out.is_dir():
            raise OutputError(f"--out {shown}: is a directory; name a file")
        if suffixes and out.suffix not in suffixes and not force:
            raise OutputError(f"--out {shown}: exists and is not a {'/'.join(suffixes)} file; "
                              "name another file or pass --force")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False, inputs: Iterable[str | os.PathLike] = (),
                force: bool = False, suffixes: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, else it vanishes.

    The arguments after ``is_dir`` are :func:`check_output`'s, which runs first.
    """
    path = check_output(path, is_dir, inputs, force, suffixes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        target = tmp / path.name
        if is_dir:
            target.mkdir()
        yield target
        if is_dir and path.exists():
            old = tmp / f"{path.name}.old"
            path.rename(old)  # same filesystem: both renames are atomic, and `old` goes with `tmp`
            target.rename(path)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
