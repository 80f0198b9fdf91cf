"""The native module's wheel: built from native/ (maturin, the machine's cargo), one abi3 wheel,
and installed into a fresh virtualenv it imports and works with no Rust toolchain on the path."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

NATIVE = Path(__file__).resolve().parents[2] / "native"

USE = """
import chio_receipts_native as n
s = n.Signer(bytes(32))
sig = s.sign(b"m")
assert n.verify_batch([(s.public_key, b"m", sig), (s.public_key, b"n", sig)]) == [True, False]
assert n.canonical_json('{"b":1,"a":2}') == b'{"a":2,"b":1}'
print(n.__file__)
"""


def test_the_wheel_installs_and_works_without_rust(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(NATIVE)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("chio_receipts_native-*.whl")
    assert "-cp311-abi3-" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if "dist-info" not in n} == {"chio_receipts_native"}
    assert "chio_receipts_native/py.typed" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # No cargo, rustc or rustup anywhere the install or the import could look.
    bare = {"PATH": str(env_dir / "bin") + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**bare, "PIP_NO_INPUT": "1"},
    )
    assert install.returncode == 0, install.stderr[-3000:]
    run = subprocess.run(
        [str(python), "-I", "-c", USE],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=bare,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith(str(env_dir))
