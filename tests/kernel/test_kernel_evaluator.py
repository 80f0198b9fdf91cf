"""ChioKernelSidecar against the real kernel's sidecar (``chio-kernel-sidecar``).

The kernel runs as ``test_kernel_sidecar`` starts it (ephemeral receipts, a control token, a
temp state dir). The trust anchor is the key of the kernel's seed file, pinned as
``kernel_key``; a second run trusts the issuer of the tokens the kernel mints instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chio_receipts.interceptor import ChioKernelSidecar, ChioSidecarRejected
from tests.kernel.test_kernel_sidecar import CONTROL_TOKEN, Sidecar, _start, _stop
from tests.support.kernel_evaluator import exercise

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    running = _start(tmp_path_factory.mktemp("kernel-eval") / "state", ["--ephemeral-receipts"])
    try:
        yield running
    finally:
        _stop(running)


@pytest.mark.parametrize("pinned", [True, False], ids=["kernel_key", "issuer"])
async def test_the_kernel_decides_and_the_step_carries_its_receipt(
    kernel: Sidecar, pinned: bool
) -> None:
    async with ChioKernelSidecar(
        kernel.url,
        control_token=CONTROL_TOKEN,
        kernel_key=kernel.kernel_key if pinned else None,
        tool_server="temporal",
        timeout=10.0,
    ) as evaluator:
        # The kernel signs an authorized call as "incomplete" (pre-execution authorization).
        await exercise(evaluator, kernel.kernel_key, allow_verdict="incomplete")


async def test_the_kernel_refuses_attenuation(kernel: Sidecar) -> None:
    async with ChioKernelSidecar(
        kernel.url, control_token=CONTROL_TOKEN, tool_server="temporal", timeout=10.0
    ) as evaluator:
        cap = await evaluator.create_capability("agent:att", ["charge_card", "refund_card"], 60)
        with pytest.raises(ChioSidecarRejected) as caught:
            await evaluator.attenuate(cap.id, scope=["charge_card"])
        assert caught.value.status == 403
