"""Pure CPU benchmarks: the codec vs json, Ed25519 libraries, Kafka compression codecs, and the
before/after of the schemas hot-path optimisations (old code kept in ``bench._legacy``)."""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

from aiokafka import codec as kafka_codec

from bench import _legacy
from bench._common import Size, median_rate, sample_receipt, signed_batch
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.schemas import (
    STEP_SCHEMA,
    KeyPair,
    decode,
    encode,
    sign_receipt,
    signed_body,
    step_body,
    verify_body,
)

__all__ = ["bench_codec", "bench_compression", "bench_crypto", "bench_optimisations"]


def _json_record(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    out["prev_hash"] = record["prev_hash"].hex()
    out["signature"] = record["signature"].hex()
    out["chio_signed"] = record["chio_signed"].hex()
    return out


def bench_codec(size: Size) -> dict[str, Any]:
    """Avro single-object encode/decode of a signed receipt vs ``json`` of the same record."""
    key = KeyPair.generate("bench")
    receipt, body = sign_receipt(sample_receipt(7), key)
    record = receipt.to_avro()
    framed = encode(STEP_SCHEMA, record)
    jrec = _json_record(record)
    jbytes = json.dumps(jrec, separators=(",", ":")).encode()
    n, reps = size.codec_n, size.reps
    avro_enc = median_rate(lambda: encode(STEP_SCHEMA, record), n, reps)
    json_enc = median_rate(lambda: json.dumps(jrec, separators=(",", ":")).encode(), n, reps)
    avro_dec = median_rate(lambda: decode(framed), n, reps)
    plain_dec = median_rate(lambda: decode_plain(framed), n, reps)
    json_dec = median_rate(lambda: json.loads(jbytes), n, reps)
    return {
        "record_bytes": {"avro_framed": len(framed), "json": len(jbytes), "avro_body": len(body)},
        "encode_per_s": {"avro": avro_enc, "json": json_enc, "ratio": avro_enc / json_enc},
        "decode_per_s": {
            "avro_logical_types": avro_dec,
            "avro_plain_consumer_path": plain_dec,
            "json": json_dec,
            "ratio": avro_dec / json_dec,
            "ratio_plain": plain_dec / json_dec,
        },
    }


def bench_crypto(size: Size) -> dict[str, Any]:
    """Ed25519 sign / verify of a receipt body: PyNaCl (signs) vs cryptography (OpenSSL)."""
    key = KeyPair.generate("bench")
    _, body = sign_receipt(sample_receipt(3), key)
    parts = signed_body(body)
    assert parts is not None
    message, signature = parts
    n, reps = size.crypto_n, size.reps
    import nacl.signing

    sk = nacl.signing.SigningKey.generate()
    vk = sk.verify_key
    sig = sk.sign(message).signature
    out: dict[str, Any] = {
        "message_bytes": len(message),
        "pynacl": {
            "sign_per_s": median_rate(lambda: sk.sign(message), n, reps),
            "verify_per_s": median_rate(lambda: vk.verify(message, sig), n, reps),
        },
        # verify_body verifies with the native core (bench.native compares it with PyNaCl).
        "native_verify_body_per_s": median_rate(lambda: verify_body(body, key.public_key), n, reps),
    }
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        out["cryptography"] = None
        out["note"] = "cryptography is not installed: comparison skipped"
        return out
    ck = Ed25519PrivateKey.generate()
    cpub = ck.public_key()
    csig = ck.sign(message)
    out["cryptography"] = {
        "sign_per_s": median_rate(lambda: ck.sign(message), n, reps),
        "verify_per_s": median_rate(lambda: cpub.verify(csig, message), n, reps),
    }
    out["ratio_pynacl_over_cryptography"] = {
        "sign": out["pynacl"]["sign_per_s"] / out["cryptography"]["sign_per_s"],
        "verify": out["pynacl"]["verify_per_s"] / out["cryptography"]["verify_per_s"],
    }
    _ = signature
    return out


def _batch_payload(bodies: list[bytes]) -> bytes:
    # A Kafka record batch is mostly the values plus per-record keys and headers; the values
    # dominate. Frame each value as the record would carry it.
    return b"".join(b"\xc3\x01" + bytes(8) + b for b in bodies)


def bench_compression(size: Size) -> dict[str, Any]:
    """lz4 vs zstd (aiokafka's codecs, Kafka's default levels) on batches of signed receipts."""
    key = KeyPair.generate("bench")
    batch_n = 500
    bodies = [b for _, b in signed_batch(batch_n, key)]
    payload = _batch_payload(bodies)
    reps = max(3, size.reps)
    rounds = max(3, size.crypto_n // 200)
    out: dict[str, Any] = {"batch_records": batch_n, "batch_bytes": len(payload)}
    for name, enc, dec in (
        ("lz4", kafka_codec.lz4_encode, kafka_codec.lz4_decode),
        ("zstd", kafka_codec.zstd_encode, kafka_codec.zstd_decode),
    ):
        compressed = enc(payload)
        assert dec(compressed) == payload
        comp_mb = median_rate(partial(enc, payload), rounds, reps) * len(payload) / 1e6
        dec_mb = median_rate(partial(dec, compressed), rounds, reps) * len(payload) / 1e6
        out[name] = {
            "compressed_bytes": len(compressed),
            "size_ratio": len(payload) / len(compressed),
            "compress_mb_per_s": comp_mb,
            "decompress_mb_per_s": dec_mb,
            "compress_records_per_s": comp_mb * 1e6 / len(payload) * batch_n,
        }
    out["zstd_size_vs_lz4"] = out["zstd"]["compressed_bytes"] / out["lz4"]["compressed_bytes"]
    out["zstd_compress_speed_vs_lz4"] = (
        out["zstd"]["compress_mb_per_s"] / out["lz4"]["compress_mb_per_s"]
    )
    return out


def bench_optimisations(size: Size) -> dict[str, Any]:
    """Same-run before/after of the schemas hot path: old code (``bench._legacy``) vs current."""
    key = KeyPair.generate("bench")
    receipt = sample_receipt(11)
    signed, body = sign_receipt(receipt, key)
    assert _legacy.sign_receipt(receipt, key)[1] == body, "signed bytes must be identical"
    assert _legacy.step_body(signed) == step_body(signed)
    n, reps = size.codec_n, size.reps
    pairs = {
        "to_avro": (lambda: _legacy.to_avro(receipt), receipt.to_avro),
        "with_signature": (
            lambda: _legacy.with_signature(receipt, key_id="k", signature=b"s"),
            lambda: receipt.with_signature(key_id="k", signature=b"s"),
        ),
        "step_body": (lambda: _legacy.step_body(signed), lambda: step_body(signed)),
        "sign_receipt": (
            lambda: _legacy.sign_receipt(receipt, key),
            lambda: sign_receipt(receipt, key),
        ),
        "verify_body": (
            lambda: _legacy.verify_body(body, key.public_key),
            lambda: verify_body(body, key.public_key),
        ),
        "decode (schemas.decode -> consumers decode_plain)": (
            lambda: decode(b"\xc3\x01" + _fp() + body),
            lambda: decode_plain(b"\xc3\x01" + _fp() + body),
        ),
    }
    out: dict[str, Any] = {}
    for name, (before, after) in pairs.items():
        b_rate = median_rate(before, n if "sign" not in name else size.crypto_n, reps)
        a_rate = median_rate(after, n if "sign" not in name else size.crypto_n, reps)
        out[name] = {
            "before_us": 1e6 / b_rate,
            "after_us": 1e6 / a_rate,
            "speedup": a_rate / b_rate,
        }
    return out


_FP: list[bytes] = []


def _fp() -> bytes:
    if not _FP:
        from chio_receipts.schemas import frame

        _FP.append(frame(STEP_SCHEMA, b"")[2:])
    return _FP[0]


async def run(size: Size, env: object = None) -> dict[str, Any]:
    """Every micro benchmark."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "codec": bench_codec(size),
        "crypto": bench_crypto(size),
        "compression": bench_compression(size),
        "optimisations": bench_optimisations(size),
    }
    out["seconds"] = time.perf_counter() - t0
    return out
