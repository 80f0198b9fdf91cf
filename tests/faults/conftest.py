"""Fault-suite fixtures and the summary table printed at the end of the session.

``import streamer`` (and the other packages) must resolve to the repository's packages, not to
the same-named test folders pytest puts on ``sys.path``: the root is appended and namespace
modules imported too early are forgotten.
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
