"""Make ``import interceptor`` resolve to the package, not to this test directory.

pytest puts ``tests/`` on ``sys.path``, where ``tests/interceptor`` would be picked up as a
namespace package named ``interceptor`` before the editable install's finder is consulted. A
regular package on ``sys.path`` always wins over a namespace portion, so the repository root is
added here (a no-op once pytest's ``pythonpath`` includes it).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
_mod = sys.modules.get("interceptor")
if _mod is not None and getattr(_mod, "__file__", None) is None:
    del sys.modules["interceptor"]
