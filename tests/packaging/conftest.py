"""One wheel build per session, from this checkout, with the build's own output kept."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Built:
    wheel: Path
    log: str  # everything pip and the build backend printed (verbose)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("wheel")
    # PYTHONDONTWRITEBYTECODE makes setuptools say it skips byte-compiling: a setting of the
    # environment running the build, not a warning about the package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (found,) = out.glob("chio_receipts-*.whl")
    return Built(found, build.stdout + build.stderr)


@pytest.fixture(scope="session")
def wheel(built: Built) -> Path:
    return built.wheel
