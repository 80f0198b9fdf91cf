//! chio_receipts_native: the pure, hot work of chio-receipts in compiled code.
//!
//! * `verify_batch`: Ed25519 over many (public key, message, signature) triples with
//!   ed25519-dalek's batch equation; a batch that fails is bisected down to single checks, so
//!   exactly the bad items are `False`.
//! * `verify`: one Ed25519 check (ed25519-dalek `VerifyingKey::verify`, as the kernel does).
//! * `sign` / `Signer`: Ed25519 signatures (deterministic, RFC 8032).
//! * `canonical_json`: the kernel's RFC 8785 canonical JSON (chio-core-types `canonical`).
//! * `verify_kernel_receipt`: chio-core-types' own `ChioReceipt` deserialisation and
//!   `ChioReceipt::verify_signature`, plus an optional trusted-signer check.
//! * `check_steps` / `check_outcomes` / `check_signed` (module `check`): the builder's whole Chio
//!   receipt check of a poll batch in one pass, every signature in one batch equation.
//! * `PlainDecoder` (module `decode`): a poll batch of single-object Avro messages decoded into
//!   plain records, fastavro's results and errors.
//! * `encode_step` / `sign_step` / `canonical_json_of` (module `encode`): the step event's Avro
//!   body and its signature in one call, and the kernel's canonical JSON of Python values.
//! * `chio_header_values` (module `headers`): the Chio receipt id and verdict for a step's Kafka
//!   headers, without parsing the whole receipt in Python.
//! * `chio_columns` (module `rows`): the Chio analytics columns of a batch of receipts, parsed once
//!   with the GIL released.
//!
//! Every function is pure; the non-trivial ones release the GIL while they work.
mod check;
mod decode;
mod encode;
mod headers;
mod rows;

use std::collections::HashMap;

use chio_core_types::canonical::{canonical_json_bytes_from_str, canonicalize};
use chio_core_types::receipt::body::ChioReceipt;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

/// Items per batch equation; a failed batch is bisected.
const DEFAULT_CHUNK: usize = 256;
/// Below this many items a failed (sub)batch is settled by single checks.
const SINGLE_BELOW: usize = 4;

/// Encodings of the points of small order, the sign bit cleared (libsodium's
/// `has_small_order` list): 0 (order 4), 1 (order 1), the two order-8 y's, p-1 (order 2), and the
/// non-canonical p and p+1. A key or an `R` among them is refused before any equation, as
/// libsodium (PyNaCl) refuses it.
const SMALL_ORDER: [[u8; 32]; 7] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

fn small_order(encoding: &[u8]) -> bool {
    SMALL_ORDER
        .iter()
        .any(|bad| encoding[..31] == bad[..31] && (encoding[31] & 0x7f) == bad[31])
}

/// True when the y coordinate of a point encoding is not reduced (y >= p = 2^255 - 19), which
/// libsodium refuses for keys and which no honest signer writes for R. Checked before the batch
/// equation so that it and the single check decide alike (the batch would decompress such an R).
fn non_canonical(encoding: &[u8]) -> bool {
    (encoding[31] & 0x7f) == 0x7f
        && encoding[1..31].iter().all(|&b| b == 0xff)
        && encoding[0] >= 0xed
}

/// A key or R that no check accepts: small order, or not reduced.
fn refused_point(encoding: &[u8]) -> bool {
    small_order(encoding) || non_canonical(encoding)
}

/// One checked item: its key, message and signature, ready for an equation.
struct Ready<'a> {
    key: VerifyingKey,
    message: &'a [u8],
    signature: Signature,
}

/// The item as Ed25519 inputs, or None when it cannot verify (sizes, a key that does not
/// decompress, a small-order or unreduced key or R). Keys are decompressed once per distinct key.
///
/// What is left between the batch equation and the single check: a signer holding the key can
/// write an R with a small-order component that one accepts and the other refuses (the batch
/// equation is not cofactored either, so it depends on the random coefficients). No one without
/// the key can, so this decides nothing about forgery; libsodium refuses such an R too.
fn prepare<'a>(
    key: &[u8],
    message: &'a [u8],
    signature: &[u8],
    keys: &mut HashMap<[u8; 32], Option<VerifyingKey>>,
) -> Option<Ready<'a>> {
    let key: [u8; 32] = key.try_into().ok()?;
    let signature: [u8; 64] = signature.try_into().ok()?;
    if refused_point(&signature[..32]) {
        return None;
    }
    let key = *keys.entry(key).or_insert_with(|| {
        if refused_point(&key) {
            None
        } else {
            VerifyingKey::from_bytes(&key).ok()
        }
    });
    Some(Ready {
        key: key?,
        message,
        signature: Signature::from_bytes(&signature),
    })
}

/// The verdict of one item: ed25519-dalek's `verify`, which chio-core-types'
/// `PublicKey::verify` calls, after the small-order screen of `prepare`.
fn single(item: &Ready<'_>) -> bool {
    item.key.verify(item.message, &item.signature).is_ok()
}

fn batch_holds(items: &[&Ready<'_>]) -> bool {
    let messages: Vec<&[u8]> = items.iter().map(|i| i.message).collect();
    let signatures: Vec<Signature> = items.iter().map(|i| i.signature).collect();
    let keys: Vec<VerifyingKey> = items.iter().map(|i| i.key).collect();
    ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
}

/// Settle `idx` (indices into `ready`/`out`): the batch equation over all of them, and when it
/// fails, each half again, down to single checks.
fn settle(ready: &[Option<Ready<'_>>], idx: &[usize], out: &mut [bool]) {
    if idx.len() < SINGLE_BELOW {
        for &i in idx {
            out[i] = ready[i].as_ref().is_some_and(single);
        }
        return;
    }
    let items: Vec<&Ready<'_>> = idx.iter().filter_map(|&i| ready[i].as_ref()).collect();
    if batch_holds(&items) {
        for &i in idx {
            out[i] = true;
        }
        return;
    }
    let (left, right) = idx.split_at(idx.len() / 2);
    settle(ready, left, out);
    settle(ready, right, out);
}

pub(crate) fn verify_all<K: AsRef<[u8]>, M: AsRef<[u8]>, S: AsRef<[u8]>>(
    items: &[(K, M, S)],
    chunk: usize,
) -> Vec<bool> {
    let mut keys = HashMap::new();
    let ready: Vec<Option<Ready<'_>>> = items
        .iter()
        .map(|(k, m, s)| prepare(k.as_ref(), m.as_ref(), s.as_ref(), &mut keys))
        .collect();
    let mut out = vec![false; items.len()];
    let candidates: Vec<usize> = (0..items.len()).filter(|&i| ready[i].is_some()).collect();
    for part in candidates.chunks(chunk.max(1)) {
        settle(&ready, part, &mut out);
    }
    out
}

/// verify_batch(items, chunk=256) -> list[bool]
///
/// Ed25519 verification of ``(public_key, message, signature)`` triples (bytes: 32, any, 64).
/// Items are checked ``chunk`` at a time with the batch equation; a chunk that fails is bisected
/// down to single checks, so exactly the items that do not verify are ``False``. The GIL is
/// released while verifying.
#[pyfunction]
#[pyo3(signature = (items, chunk = DEFAULT_CHUNK))]
fn verify_batch(
    py: Python<'_>,
    items: Vec<(PyBackedBytes, PyBackedBytes, PyBackedBytes)>,
    chunk: usize,
) -> Vec<bool> {
    py.detach(|| verify_all(&items, chunk))
}

/// verify(public_key, message, signature) -> bool: one Ed25519 check.
#[pyfunction]
fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let mut keys = HashMap::new();
    prepare(public_key, message, signature, &mut keys).is_some_and(|r| single(&r))
}

fn seed_of(seed: &[u8]) -> PyResult<[u8; 32]> {
    seed.try_into()
        .map_err(|_| PyValueError::new_err("an Ed25519 seed is 32 bytes"))
}

/// sign(seed, message) -> bytes: the 64-byte Ed25519 signature of ``message`` by the key of the
/// 32-byte ``seed`` (derives the key each call; ``Signer`` keeps it).
#[pyfunction]
fn sign<'py>(py: Python<'py>, seed: &[u8], message: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let key = SigningKey::from_bytes(&seed_of(seed)?);
    Ok(PyBytes::new(py, &key.sign(message).to_bytes()))
}

/// An Ed25519 signing key held natively. Its secret never leaves it and never prints.
#[pyclass(frozen, module = "chio_receipts_native")]
struct Signer {
    key: SigningKey,
}

#[pymethods]
impl Signer {
    #[new]
    fn new(seed: &[u8]) -> PyResult<Self> {
        Ok(Self {
            key: SigningKey::from_bytes(&seed_of(seed)?),
        })
    }

    /// The 32-byte raw public key.
    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.key.verifying_key().as_bytes())
    }

    /// The 64-byte signature of ``message``.
    fn sign<'py>(&self, py: Python<'py>, message: &[u8]) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.key.sign(message).to_bytes())
    }

    fn __repr__(&self) -> String {
        format!(
            "Signer(public_key={})",
            self.key
                .verifying_key()
                .as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    }
}

/// canonical_json(json_text, strict=False) -> bytes
///
/// RFC 8785 canonical JSON of ``json_text`` as the kernel writes it (chio-core-types
/// ``canonicalize`` over a ``serde_json::Value``). ``strict=True`` is the kernel's strict text
/// path (``canonical_json_bytes_from_str``: duplicate keys, integers beyond 2^53-1, integers
/// written as floats and over-precise fractions refused). Raises ``ValueError`` for input
/// without a canonical form.
#[pyfunction]
#[pyo3(signature = (json_text, strict = false))]
fn canonical_json<'py>(
    py: Python<'py>,
    json_text: &str,
    strict: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let result: Result<Vec<u8>, String> = py.detach(|| {
        if strict {
            canonical_json_bytes_from_str(json_text).map_err(|e| e.to_string())
        } else {
            let value: serde_json::Value =
                serde_json::from_str(json_text).map_err(|e| e.to_string())?;
            canonicalize(&value)
                .map(String::into_bytes)
                .map_err(|e| e.to_string())
        }
    });
    match result {
        Ok(bytes) => Ok(PyBytes::new(py, &bytes)),
        Err(reason) => Err(PyValueError::new_err(format!(
            "no canonical JSON: {reason}"
        ))),
    }
}

fn normal_key(key: &str) -> String {
    key.trim()
        .trim_start_matches("0x")
        .trim_start_matches("0X")
        .to_ascii_lowercase()
}

/// verify_kernel_receipt(json_text, trusted_keys=None) -> tuple[bool, str | None]
///
/// The kernel's own check of a signed receipt: chio-core-types 0.1.2 deserialises
/// ``ChioReceipt`` and runs ``ChioReceipt::verify_signature`` (v1 semantics, the
/// content-addressed id, Ed25519 over ``{"id", "body"}``). With ``trusted_keys`` (hex Ed25519
/// keys, ``0x`` or upper case accepted) the signer must be one of them. Returns
/// ``(valid, reason)``, ``reason`` ``None`` when valid. The GIL is released while checking.
#[pyfunction]
#[pyo3(signature = (json_text, trusted_keys = None))]
fn verify_kernel_receipt(
    py: Python<'_>,
    json_text: &str,
    trusted_keys: Option<Vec<String>>,
) -> (bool, Option<String>) {
    py.detach(|| {
        let receipt: ChioReceipt = match serde_json::from_str(json_text) {
            Ok(receipt) => receipt,
            Err(e) => return (false, Some(format!("parse: {e}"))),
        };
        match receipt.verify_signature() {
            Ok(true) => {}
            Ok(false) => return (false, Some("verify_signature: invalid".to_string())),
            Err(e) => return (false, Some(format!("verify_signature: {e}"))),
        }
        if let Some(trusted) = trusted_keys {
            let signer = normal_key(&receipt.kernel_key.to_hex());
            if !trusted.iter().any(|k| normal_key(k) == signer) {
                return (
                    false,
                    Some("kernel_key is not a trusted signer".to_string()),
                );
            }
        }
        (true, None)
    })
}

#[pymodule]
fn chio_receipts_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(verify_batch, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(sign, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_json, m)?)?;
    m.add_function(wrap_pyfunction!(verify_kernel_receipt, m)?)?;
    m.add_function(wrap_pyfunction!(check::check_steps, m)?)?;
    m.add_function(wrap_pyfunction!(check::check_outcomes, m)?)?;
    m.add_function(wrap_pyfunction!(check::check_signed, m)?)?;
    m.add_function(wrap_pyfunction!(check::step_request_id, m)?)?;
    m.add_function(wrap_pyfunction!(check::outcome_request_id, m)?)?;
    m.add_function(wrap_pyfunction!(rows::chio_columns, m)?)?;
    m.add_class::<Signer>()?;
    m.add_function(wrap_pyfunction!(encode::encode_step, m)?)?;
    m.add_function(wrap_pyfunction!(encode::sign_step, m)?)?;
    m.add_function(wrap_pyfunction!(encode::canonical_json_of, m)?)?;
    m.add_class::<decode::PlainDecoder>()?;
    m.add_function(wrap_pyfunction!(headers::chio_header_values, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
