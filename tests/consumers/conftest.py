"""Make the repository root importable ahead of this test folder's namespace-package twin.

``tests/<name>`` shares its name with the top-level package it tests; with pytest's rootdir
insertion, ``import <name>`` would otherwise resolve to this folder as a namespace package.
A regular package anywhere on ``sys.path`` wins over a namespace portion, so appending the
root is enough.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
