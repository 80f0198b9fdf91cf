"""The wheel installs two top-level packages, ``chio_receipts`` and the seed's ``chio_temporal``
facade, and their public API imports from a fresh virtualenv.

The wheel is built from this checkout (pip, isolated build), its top-level names are listed, and
it is installed without dependencies into a new virtualenv whose only other path is the project
environment's site-packages (for the third-party dependencies, not for this project: an editable
install is not visible that way). The import then has to come from the wheel.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TOP_LEVEL = {"chio_receipts", "chio_temporal"}

PUBLIC_API = """
import chio_receipts, pathlib, sys
where = pathlib.Path(chio_receipts.__file__).resolve()
assert where.is_relative_to(pathlib.Path(sys.prefix).resolve()), where
from chio_receipts.interceptor import (
    DENIED_ERROR_TYPE, ChioActivityInterceptor, ChioClient, WorkflowGrant, build_chio_worker,
)
from chio_receipts.streamer import ReceiptStreamer, StreamerConfig
from chio_receipts.consumers import ReceiptBuilderService, verify_run
from chio_receipts.schemas import STEP_SCHEMA, TopicNames, parsed_schema
parsed_schema(STEP_SCHEMA)  # the Avro schemas ship as package data
from chio_receipts.consumers._clickhouse import migrations
assert migrations(), "the SQL migrations ship as package data"
from chio_receipts.sidecar import CedarPolicySet
from chio_receipts.sidecar._cedar import schema_text
assert "namespace Chio" in schema_text(), "the Cedar schema ships as package data"
from chio_receipts.demo._run import DEMO_POLICY
assert len(CedarPolicySet.load(DEMO_POLICY)) == 3, "the demo's policies ship and validate"
for bare in ("interceptor", "streamer", "consumers", "schemas"):
    try:
        __import__(bare)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(f"the wheel installed a top-level {bare!r}")
assert DENIED_ERROR_TYPE == "ChioCapabilityDenied"
import chio_temporal
assert pathlib.Path(chio_temporal.__file__).resolve().is_relative_to(
    pathlib.Path(sys.prefix).resolve()
), chio_temporal.__file__
from chio_temporal import (
    DENIED_ERROR_TYPE as SEED_DENIED, ActivityGrantOverride, ChioTemporalConfigError,
    ChioTemporalError, WorkflowReceipt, WorkflowStepReceipt, scope_for,
)
assert chio_temporal.ChioActivityInterceptor is ChioActivityInterceptor
assert chio_temporal.WorkflowGrant is WorkflowGrant
assert chio_temporal.build_chio_worker is build_chio_worker
assert SEED_DENIED == DENIED_ERROR_TYPE
assert sorted(chio_temporal.__all__) == sorted([
    "ChioActivityInterceptor", "ActivityGrantOverride", "WorkflowGrant", "WorkflowReceipt",
    "WorkflowStepReceipt", "build_chio_worker", "DENIED_ERROR_TYPE", "ChioTemporalError",
    "ChioTemporalConfigError", "scope_for", "reverse_budget_charge", "current_receipt_id",
])
assert (pathlib.Path(chio_temporal.__file__).parent / "py.typed").is_file()
from chio_sdk.models import ChioScope
assert isinstance(scope_for("read_database"), ChioScope)
print("ok")
"""


def test_wheel_has_the_two_top_level_packages(wheel: Path) -> None:
    names = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    dist_info = {n for n in names if n.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert names - dist_info == TOP_LEVEL


def test_wheel_installs_and_imports_the_public_api(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # Third-party dependencies come from this environment's site-packages, added as a plain path
    # (its .pth files, among them the editable install of this project, are not processed).
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "project-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run = subprocess.run(
        [str(python), "-c", PUBLIC_API],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok"
