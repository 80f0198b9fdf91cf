"""Verification keys from a sidecar-style key endpoint (a real local HTTP server)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from chio_receipts.consumers import KeyResolutionError, KeyRing, fetch_public_keys
from chio_receipts.schemas import KeyPair
from tests.support.http_receiver import Receiver

pytestmark = pytest.mark.integration


async def test_fetch_keys_hex_and_base64_and_refresh_on_unknown_key() -> None:
    a, b = KeyPair.generate("k-a"), KeyPair.generate("k-b")
    doc = {
        "current": "k-a",
        "keys": [
            {"key_id": "k-a", "algorithm": "Ed25519", "public_key": a.public_key.hex()},
            {"key_id": "k-b", "public_key": base64.b64encode(b.public_key).decode()},
        ],
    }
    async with Receiver(reply=lambda _: json.dumps(doc).encode()) as server:
        keys = await fetch_public_keys(server.url)
        assert keys == {"k-a": a.public_key, "k-b": b.public_key}
        assert server.requests[0][:2] == ("GET", "/v1/keys")
        ring = KeyRing({}, url=server.url, min_refresh_interval=0)
        assert ring.get("k-b") is None
        assert await ring.refresh()
        assert ring.get("k-b") == b.public_key


async def test_fetch_keys_fails_clearly_when_the_endpoint_is_down() -> None:
    async with Receiver(status=[500, 500]) as server:
        with pytest.raises(KeyResolutionError, match="cannot fetch keys"):
            await fetch_public_keys(server.url)


async def test_an_unknown_key_id_waits_for_one_refresh_past_the_rate_limit() -> None:
    """A key rotated just after the last refresh is still found before anything is given up:
    the lookup waits out the rate limit once; a forged id does not make it wait again."""
    a, b = KeyPair.generate("k-a"), KeyPair.generate("k-b")
    published = [{"key_id": "k-a", "public_key": a.public_key.hex()}]
    async with Receiver(reply=lambda _: json.dumps({"keys": published}).encode()) as server:
        ring = KeyRing({}, url=server.url, min_refresh_interval=0.5)
        assert await ring.refresh()
        published.append({"key_id": "k-b", "public_key": b.public_key.hex()})
        await ring.refresh_for({"k-a", "k-b"})
        assert ring.get("k-b") == b.public_key
        assert len(server.requests) == 2
        await ring.refresh_for({"k-forged"})
        assert ring.get("k-forged") is None
        assert len(server.requests) == 3
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await ring.refresh_for({"k-forged"})
        assert loop.time() - t0 < 0.2, "a forged id made the ring wait twice"
        assert len(server.requests) == 3
