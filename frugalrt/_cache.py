"""The frugalrt cache folder, ``${XDG_CACHE_HOME:-~/.cache}/frugalrt``: downloaded userlands,
built plugins, bundles and firmware, shared by every module that caches."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "frugalrt"
