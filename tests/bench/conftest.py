"""Make the repository's ``bench`` package importable from the tests.

``bench/`` is not an installed package, and ``tests/`` (on ``sys.path`` for its conftest) holds
this ``bench`` directory, which would otherwise shadow it as a namespace package.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
sys.modules.pop("bench", None)
