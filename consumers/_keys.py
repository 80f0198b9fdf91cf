"""Verification keys: a mapping key id -> raw Ed25519 public key, from configuration or from the
sidecar's key endpoint (``GET /v1/keys`` -> ``{"keys": [{"key_id": ..., "public_key": ...}]}``,
public keys in base64 or hex)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import httpx

from chio_receipts.consumers._errors import KeyResolutionError

__all__ = ["KeyRing", "decode_public_key", "fetch_public_keys", "load_keys_file"]

_log = logging.getLogger(__name__)
_KEY_SIZE = 32


def decode_public_key(text: str) -> bytes:
    """A 32-byte Ed25519 public key from hex (64 digits) or base64 (standard or url-safe)."""
    value = text.strip()
    raw: bytes | None = None
    if len(value) == 2 * _KEY_SIZE:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = None
    if raw is None:
        try:
            padded = value + "=" * (-len(value) % 4)
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyResolutionError("public key is neither hex nor base64") from exc
    if len(raw) != _KEY_SIZE:
        raise KeyResolutionError(f"public key has {len(raw)} bytes, expected {_KEY_SIZE}")
    return raw


def _parse_key_list(payload: object) -> dict[str, bytes]:
    if not isinstance(payload, dict) or not isinstance(payload.get("keys"), list):
        raise KeyResolutionError('key document must be {"keys": [{"key_id", "public_key"}]}')
    keys: dict[str, bytes] = {}
    for item in payload["keys"]:
        if not isinstance(item, dict):
            raise KeyResolutionError("key entry is not an object")
        key_id, public_key = item.get("key_id"), item.get("public_key")
        if not isinstance(key_id, str) or not isinstance(public_key, str):
            raise KeyResolutionError("key entry needs string key_id and public_key")
        keys[key_id] = decode_public_key(public_key)
    return keys


def load_keys_file(path: Path) -> dict[str, bytes]:
    """Keys from a JSON file: either ``{"keys": [...]}`` or a plain ``{key_id: public_key}``."""
    try:
        payload = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise KeyResolutionError(f"cannot read keys file {path}: {exc}") from exc
    if isinstance(payload, dict) and "keys" not in payload:
        return {str(k): decode_public_key(str(v)) for k, v in payload.items()}
    return _parse_key_list(payload)


async def fetch_public_keys(url: str, *, timeout_seconds: float = 5.0) -> dict[str, bytes]:
    """Keys served by a sidecar; ``url`` is its base URL or the full ``/v1/keys`` URL."""
    target = url if url.rstrip("/").endswith("/v1/keys") else url.rstrip("/") + "/v1/keys"
    try:
        async with httpx.AsyncClient(timeout=timeout_seconds) as client:
            response = await client.get(target)
            response.raise_for_status()
            payload = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise KeyResolutionError(f"cannot fetch keys from {target}: {exc}") from exc
    return _parse_key_list(payload)


class KeyRing:
    """Public keys by key id; asks the sidecar again (rate limited) for an unknown key id.

    A rotated sidecar key reaches a verifier as an unknown key id: :meth:`refresh_for` makes
    sure such an id was looked up once before the caller gives up on it (dead-letters), even
    when the last refresh was moments ago.

    The ring is also the trust list of Chio kernel receipts: :attr:`trusted_hex` is the lowercase
    hex of every public key it knows plus the operator's ``trusted_kernel_keys``; an unknown
    ``kernel_key`` is refreshed for in the same way as an unknown key id
    (``refresh_for(kernel_keys=...)``).
    """

    __slots__ = (
        "_kernel_keys",
        "_keys",
        "_last_refresh",
        "_looked_up",
        "_min_interval",
        "_trusted",
        "_url",
    )

    def __init__(
        self,
        keys: Mapping[str, bytes] | None = None,
        *,
        url: str | None = None,
        min_refresh_interval: float = 5.0,
        trusted_kernel_keys: Iterable[str] = (),
    ) -> None:
        self._keys: dict[str, bytes] = dict(keys or {})
        self._url = url
        self._min_interval = min_refresh_interval
        self._last_refresh = float("-inf")
        # Ids still unknown after a refresh made for them: they wait for the rate limit.
        self._looked_up: set[str] = set()
        self._kernel_keys = frozenset(k.lower() for k in trusted_kernel_keys)
        self._trusted: frozenset[str] | None = None

    @property
    def keys(self) -> Mapping[str, bytes]:
        """The keys known now."""
        return self._keys

    @property
    def trusted_hex(self) -> frozenset[str]:
        """Who may sign a Chio receipt: the hex of every key known now, plus the configured
        trusted kernel keys (lowercase hex)."""
        trusted = self._trusted
        if trusted is None:
            trusted = self._kernel_keys | {k.hex() for k in self._keys.values()}
            self._trusted = trusted
        return trusted

    def get(self, key_id: str) -> bytes | None:
        """The public key of ``key_id``, or None."""
        return self._keys.get(key_id)

    async def refresh(self, *, force: bool = False) -> bool:
        """Fetch the sidecar's keys (if a URL is configured); True when something was added."""
        if self._url is None:
            return False
        now = time.monotonic()
        if not force and now - self._last_refresh < self._min_interval:
            return False
        self._last_refresh = now
        try:
            fetched = await fetch_public_keys(self._url)
        except KeyResolutionError:
            if force:
                raise
            _log.warning("key refresh from %s failed", self._url, exc_info=True)
            return False
        added = any(self._keys.get(k) != v for k, v in fetched.items())
        self._keys.update(fetched)
        if added:
            self._trusted = None
        return added

    async def refresh_for(
        self, key_ids: Iterable[str] = (), *, kernel_keys: Iterable[str] = ()
    ) -> None:
        """Refresh once for key ids (or Chio ``kernel_keys``, hex) not known yet, waiting out
        the rate limit if needed.

        An id is looked up by at most one refresh that waited for it; after that (a forged or
        foreign id) it only gets the plain rate-limited :meth:`refresh`, so unknown ids cannot
        make the builder wait more than once each.
        """
        trusted = self.trusted_hex
        unknown = {k for k in key_ids if k not in self._keys}
        unknown |= {"kernel:" + k for k in kernel_keys if k not in trusted}
        if not unknown or self._url is None:
            return
        if unknown <= self._looked_up:
            await self.refresh()
            return
        wait = self._last_refresh + self._min_interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await self.refresh()
        if len(self._looked_up) > 10_000:
            self._looked_up.clear()
        trusted = self.trusted_hex
        self._looked_up.update(
            k for k in unknown if k not in self._keys and k.removeprefix("kernel:") not in trusted
        )
