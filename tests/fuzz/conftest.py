"""Make ``import schemas`` / ``import consumers`` resolve to the packages, not to test folders.

pytest puts ``tests/`` on ``sys.path``, where ``tests/schemas`` would be picked up as a namespace
package named ``schemas``. A regular package on ``sys.path`` wins over a namespace portion, so the
repository root is added and a namespace module imported too early is forgotten.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
for _name in ("schemas", "consumers", "streamer", "interceptor"):
    _mod = sys.modules.get(_name)
    if _mod is not None and getattr(_mod, "__file__", None) is None:
        del sys.modules[_name]
