"""Where the project's shared specification and reference fixtures live.

CI clones the project with ``shared/`` beside the clone; ``POP3D_SHARED`` overrides the location.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    candidates = [os.environ.get("POP3D_SHARED"), ROOT.parent / "shared", ROOT / "shared", "/work/shared"]
    for c in candidates:
        if c and (Path(c) / "fixtures").is_dir():
            return Path(c)
    raise FileNotFoundError(f"no shared/ folder with fixtures beside {ROOT} (set POP3D_SHARED)")


SHARED = shared_dir()
FIXTURES = SHARED / "fixtures"
SPEC = SHARED / "spec"
