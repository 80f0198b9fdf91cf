//! The Chio receipt check of step events and outcome records, a poll batch at a time.
//!
//! `check_steps` / `check_outcomes` run, for every item, the check of
//! `schemas.check_chio_step` / `schemas.check_chio_outcome` (the order of its refusals and their
//! wording), and verify every Ed25519 signature of the batch (the steps' Avro signatures and the
//! receipts' own) with one `verify_all`, the batch verifier of `verify_batch`. Each receipt is
//! parsed once (serde_json); the parameter hash is chio-core-types' canonical JSON; SHA-256 is
//! `sha2`. The record fields are read with the GIL held; everything else runs without it.
//!
//! Python semantics kept on purpose:
//! * the body equality is Python's `dict` equality of `json.loads` values: numbers compare by
//!   value (`1 == 1.0`) and `true == 1`, `false == 0`;
//! * the signature is read as `bytes.fromhex` reads it (ASCII whitespace between the byte pairs
//!   is skipped), the key as 64 hex digits after an optional `0x`, lower-cased;
//! * the request id is the SHA-256 of `json.dumps(values, ensure_ascii=True,
//!   separators=(",", ":"))`.
//!
//! Where serde_json and Python's `json` disagree on what is JSON (NaN, Infinity, numbers beyond
//! f64, lone surrogates, nesting deeper than 128, non-UTF-8 bodies), the receipt is refused here
//! with the parser's own message; Python would have parsed it and refused it later, or (for a
//! UTF-16 body) accepted it. No kernel writes such a receipt.
//!
//! One difference in the other direction: an integer literal beyond u64 (the kernel writes the
//! float 2**64 as `18446744073709552000`) is an f64 here, as in the kernel, where Python reads
//! an exact int that no float equals; such a receipt holds here and was refused by the Python
//! check as differing from its signed body (pinned in `tests/native/test_native_check.py`).
//!
//! The record is read field by field (a dict by key, a `StepReceipt`/`StepOutcome` by attribute):
//! a missing field the request id or a comparison needs, a value that is not None, bool, int, str
//! or a list of them, or a string with a lone surrogate makes the record "not readable" (the
//! text after the colon is this module's: `'name'` for a missing field). `from_avro` refused
//! missing fields too; the Avro decoder never yields the others.
use std::collections::HashSet;

use chio_core_types::canonical::canonicalize;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::{PyBackedBytes, PyBackedStr};
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::verify_all;

const BODY_PREFIX: &[u8] = b"{\"body\":";
const ID_SUFFIX_LEN: usize = 7 + 64 + 2;
const SIGNATURE_REFUSAL: &str = "the Chio receipt signature does not verify under kernel_key";
const REQUEST_ID_PREFIX: &str = "chio-temporal-v1:";
const OUTCOME_REQUEST_ID_PREFIX: &str = "chio-temporal-v1-outcome:";
const CHUNK: usize = 256;

/// How a missing record field reads: required (a `KeyError`), or the dataclass default.
#[derive(Clone, Copy)]
enum Missing {
    Required,
    Empty,
    Zero,
    NoBytes,
    Unknown,
}

/// The step fields the request id binds, in order (`schemas._chio_step._BOUND_FIELDS`); then
/// `prev_hash` as hex.
const STEP_BOUND: [(&str, Missing); 21] = [
    ("receipt_id", Missing::Required),
    ("namespace", Missing::Required),
    ("workflow_id", Missing::Required),
    ("run_id", Missing::Required),
    ("workflow_type", Missing::Required),
    ("task_queue", Missing::Required),
    ("activity_id", Missing::Required),
    ("activity_type", Missing::Required),
    ("attempt", Missing::Required),
    ("is_local", Missing::Required),
    ("action", Missing::Required),
    ("resource", Missing::Required),
    ("subject", Missing::Required),
    ("capability_chain", Missing::Required),
    ("scope", Missing::Required),
    ("argument_digest", Missing::Required),
    ("argument_key_id", Missing::Required),
    ("scheduled_at", Missing::Required),
    ("started_at", Missing::Required),
    ("evaluated_at", Missing::Required),
    ("worker_identity", Missing::Required),
];

/// Every outcome field but the receipt, in schema order
/// (`schemas._chio_outcome._BOUND_FIELDS`); `status` as its symbol.
const OUTCOME_BOUND: [(&str, Missing); 25] = [
    ("outcome_id", Missing::Required),
    ("namespace", Missing::Required),
    ("workflow_id", Missing::Required),
    ("run_id", Missing::Required),
    ("workflow_type", Missing::Required),
    ("task_queue", Missing::Required),
    ("activity_id", Missing::Required),
    ("activity_type", Missing::Required),
    ("attempt", Missing::Required),
    ("is_local", Missing::Required),
    ("tool_server", Missing::Required),
    ("tool", Missing::Required),
    ("capability_id", Missing::Required),
    ("decision_receipt_id", Missing::Required),
    ("decision_chio_id", Missing::Empty),
    ("status", Missing::Unknown),
    ("error_type", Missing::Empty),
    ("started_at", Missing::Required),
    ("ended_at", Missing::Required),
    ("duration_us", Missing::Zero),
    ("result_digest", Missing::Empty),
    ("result_key_id", Missing::Empty),
    ("worker_identity", Missing::Empty),
    ("trace_id", Missing::Empty),
    ("span_id", Missing::Empty),
];
const OUTCOME_STATUS: usize = 15;

/// A record value as `json.dumps` sees it (and as the comparisons with the receipt see it).
enum Py {
    Null,
    Bool(bool),
    Int(i64),
    BigInt(String),
    Str(PyBackedStr),
    Owned(String),
    List(Vec<Py>),
}

impl Py {
    /// The value as a JSON value, for the comparisons (`Value::Null` is Python's `None`).
    fn to_json(&self) -> Value {
        match self {
            Py::Null => Value::Null,
            Py::Bool(b) => Value::Bool(*b),
            Py::Int(i) => Value::from(*i),
            Py::BigInt(s) => s
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::Null, Value::Number),
            Py::Str(s) => Value::String(s.to_string()),
            Py::Owned(s) => Value::String(s.clone()),
            Py::List(items) => Value::Array(items.iter().map(Py::to_json).collect()),
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Py::Str(s) => Some(s),
            Py::Owned(s) => Some(s),
            _ => None,
        }
    }

    /// Python's `value == json_value` (`json_value` `None`: a key `.get` did not find).
    fn eq_json(&self, json: Option<&Value>) -> bool {
        match (self, json) {
            (Py::Str(s), Some(Value::String(t))) => &**s == t.as_str(),
            (Py::Owned(s), Some(Value::String(t))) => s == t,
            (Py::Null, None) => true,
            (_, None) => false,
            (_, Some(v)) => py_eq(&self.to_json(), v),
        }
    }
}

fn key_error(name: &str) -> String {
    format!("'{name}'")
}

/// One value of a record (a dict: by key; anything else, a `StepReceipt`/`StepOutcome`: by
/// attribute), or its default.
fn field<'py>(
    record: &Bound<'py, PyAny>,
    name: &str,
    missing: Missing,
) -> Result<Option<Bound<'py, PyAny>>, String> {
    let got = match record.cast::<PyDict>() {
        Ok(dict) => dict.get_item(name).map_err(|e| e.to_string())?,
        Err(_) => record.getattr(name).ok(),
    };
    match (got, missing) {
        (Some(value), _) => Ok(Some(value)),
        (None, Missing::Required) => Err(key_error(name)),
        (None, _) => Ok(None),
    }
}

fn default_of(missing: Missing) -> Py {
    match missing {
        Missing::Zero => Py::Int(0),
        Missing::Unknown => Py::Owned("UNKNOWN".to_string()),
        _ => Py::Owned(String::new()),
    }
}

/// A value for `json.dumps` (None, bool, int, str, and lists or tuples of them).
fn py_value(value: &Bound<'_, PyAny>) -> PyResult<Py> {
    if value.is_none() {
        return Ok(Py::Null);
    }
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(Py::Bool(b.is_true()));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(Py::Str(PyBackedStr::try_from(s.clone())?));
    }
    if value.cast::<PyInt>().is_ok() {
        return Ok(match value.extract::<i64>() {
            Ok(i) => Py::Int(i),
            Err(_) => Py::BigInt(value.str()?.to_string()),
        });
    }
    if value.cast::<PyList>().is_ok() || value.cast::<PyTuple>().is_ok() {
        return value
            .try_iter()?
            .map(|item| py_value(&item?))
            .collect::<PyResult<Vec<_>>>()
            .map(Py::List);
    }
    Err(PyTypeError::new_err(format!(
        "a {} is not a record value",
        value.get_type().name()?
    )))
}

/// A string field (ids: `str(value)`, as `from_avro` reads them).
fn py_str(value: &Bound<'_, PyAny>) -> PyResult<Py> {
    match value.cast::<PyString>() {
        Ok(s) => Ok(Py::Str(PyBackedStr::try_from(s.clone())?)),
        Err(_) => Ok(Py::Owned(value.str()?.to_str()?.to_string())),
    }
}

/// A timestamp (int microseconds, or a datetime as fastavro's logical reader gives it).
fn py_micros(value: &Bound<'_, PyAny>) -> PyResult<Py> {
    if value.cast::<PyInt>().is_ok() && value.cast::<PyBool>().is_err() {
        return py_value(value);
    }
    let micros = value
        .py()
        .import("chio_receipts.schemas._records")?
        .getattr("_micros")?
        .call1((value,))?;
    py_value(&micros)
}

fn py_list(value: &Bound<'_, PyAny>) -> PyResult<Py> {
    // `tuple(value)`: any iterable (a str too, char by char).
    value
        .try_iter()?
        .map(|item| py_value(&item?))
        .collect::<PyResult<Vec<_>>>()
        .map(Py::List)
}

/// What a check needs of one record.
struct Input {
    receipt: Result<PyBackedStr, String>,
    signed: Option<PyBackedBytes>,
    bound: Vec<Py>,
    prefix: &'static str,
    capability_id: Py,
    tool_server: Py,
    tool: Py,
    /// Steps only: the verdict (ALLOW, DENY, PENDING_APPROVAL or UNKNOWN) and the reason.
    verdict: Option<(&'static str, Py)>,
    kind: Kind,
}

/// Which checks follow the signed receipt's.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Step,
    Outcome,
    Signed,
}

const VERDICTS: [&str; 4] = ["UNKNOWN", "ALLOW", "DENY", "PENDING_APPROVAL"];

fn receipt_text<'py>(record: &Bound<'py, PyAny>) -> Result<Option<Bound<'py, PyAny>>, String> {
    let value = field(record, "chio_receipt", Missing::Empty)?;
    Ok(value.filter(|v| v.is_truthy().unwrap_or(true)))
}

fn read_receipt(value: &Bound<'_, PyAny>) -> Result<PyBackedStr, String> {
    value
        .extract::<PyBackedStr>()
        .map_err(|e| format!("chio_receipt is not JSON: {e}"))
}

fn read_signed(record: &Bound<'_, PyAny>) -> Result<Option<PyBackedBytes>, String> {
    match field(record, "chio_signed", Missing::NoBytes)? {
        None => Ok(None),
        Some(value) => {
            if let Ok(s) = value.cast::<PyString>() {
                // A resolved default reads as str for a bytes field (from_avro: latin-1).
                let text = s.to_str().map_err(|e| e.to_string())?;
                let bytes = text
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)).ok())
                    .collect::<Option<Vec<u8>>>()
                    .ok_or("chio_signed is text that is not latin-1")?;
                return Ok(Some(PyBackedBytes::from(PyBytes::new(value.py(), &bytes))));
            }
            value
                .extract::<PyBackedBytes>()
                .map(Some)
                .map_err(|e| e.to_string())
        }
    }
}

fn bound_values(record: &Bound<'_, PyAny>, fields: &[(&str, Missing)]) -> Result<Vec<Py>, String> {
    let mut out = Vec::with_capacity(fields.len() + 1);
    for &(name, missing) in fields {
        let value = match field(record, name, missing)? {
            None => default_of(missing),
            Some(value) => match name {
                "receipt_id" | "outcome_id" => py_str(&value),
                "capability_chain" | "scope" => py_list(&value),
                "scheduled_at" | "started_at" | "evaluated_at" | "ended_at" => py_micros(&value),
                _ => py_value(&value),
            }
            .map_err(|e| e.to_string())?,
        };
        out.push(value);
    }
    Ok(out)
}

fn compared(record: &Bound<'_, PyAny>, name: &str) -> Result<Py, String> {
    let value = field(record, name, Missing::Required)?.expect("required");
    py_value(&value).map_err(|e| e.to_string())
}

fn step_input(record: &Bound<'_, PyAny>) -> Result<Option<Input>, String> {
    let Some(text) = receipt_text(record)? else {
        return Ok(None);
    };
    let mut bound = bound_values(record, &STEP_BOUND)?;
    let prev = match field(record, "prev_hash", Missing::NoBytes)? {
        None => String::new(),
        Some(value) => hex(&value
            .extract::<PyBackedBytes>()
            .map_err(|e| e.to_string())?),
    };
    bound.push(Py::Owned(prev));
    let verdict_value = field(record, "verdict", Missing::Required)?.expect("required");
    let verdict = verdict_value
        .cast::<PyString>()
        .ok()
        .and_then(|s| s.to_str().ok().map(str::to_owned))
        .and_then(|s| VERDICTS.iter().copied().find(|v| *v == s))
        .unwrap_or("UNKNOWN");
    Ok(Some(Input {
        receipt: read_receipt(&text),
        signed: read_signed(record)?,
        bound,
        prefix: REQUEST_ID_PREFIX,
        capability_id: compared(record, "capability_id")?,
        tool_server: compared(record, "tool_server")?,
        tool: compared(record, "tool")?,
        verdict: Some((verdict, compared(record, "reason")?)),
        kind: Kind::Step,
    }))
}

fn outcome_input(
    record: &Bound<'_, PyAny>,
    statuses: &HashSet<String>,
) -> Result<Option<Input>, String> {
    let Some(text) = receipt_text(record)? else {
        return Ok(None);
    };
    let mut bound = bound_values(record, &OUTCOME_BOUND)?;
    // `_enum(StepStatus, value).value`: an unknown symbol reads as UNKNOWN.
    let status = bound[OUTCOME_STATUS]
        .as_str()
        .filter(|s| statuses.contains(*s))
        .map_or_else(|| "UNKNOWN".to_string(), str::to_owned);
    bound[OUTCOME_STATUS] = Py::Owned(status);
    Ok(Some(Input {
        receipt: read_receipt(&text),
        signed: read_signed(record)?,
        bound,
        prefix: OUTCOME_REQUEST_ID_PREFIX,
        capability_id: compared(record, "capability_id")?,
        tool_server: compared(record, "tool_server")?,
        tool: compared(record, "tool")?,
        verdict: None,
        kind: Kind::Outcome,
    }))
}

// ---------------------------------------------------------------- JSON, hashes

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// `json.dumps(text, ensure_ascii=True)`.
fn dump_str(text: &str, out: &mut String) {
    out.push('"');
    if text
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(text);
        out.push('"');
        return;
    }
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

fn dump(value: &Py, out: &mut String) {
    match value {
        Py::Null => out.push_str("null"),
        Py::Bool(true) => out.push_str("true"),
        Py::Bool(false) => out.push_str("false"),
        Py::Int(i) => out.push_str(&i.to_string()),
        Py::BigInt(s) => out.push_str(s),
        Py::Str(s) => dump_str(s, out),
        Py::Owned(s) => dump_str(s, out),
        Py::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                dump(item, out);
            }
            out.push(']');
        }
    }
}

fn request_id(prefix: &str, bound: &[Py]) -> String {
    let mut text = String::with_capacity(512);
    text.push('[');
    for (i, value) in bound.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        dump(value, &mut text);
    }
    text.push(']');
    format!("{prefix}{}", sha256_hex(text.as_bytes()))
}

/// A JSON number as Python compares it: an exact integer or a float.
enum Num {
    Int(i128),
    Float(f64),
}

fn num(value: &Value) -> Option<Num> {
    match value {
        Value::Bool(b) => Some(Num::Int(i128::from(*b))),
        Value::Number(n) => Some(if let Some(i) = n.as_i64() {
            Num::Int(i128::from(i))
        } else if let Some(u) = n.as_u64() {
            Num::Int(i128::from(u))
        } else {
            Num::Float(n.as_f64().unwrap_or(f64::NAN))
        }),
        _ => None,
    }
}

fn int_eq_float(i: i128, f: f64) -> bool {
    // Python compares int and float exactly.
    f.is_finite() && f.fract() == 0.0 && f.abs() < 1.8e19 && (f as i128) == i
}

/// Python's `==` of two `json.loads` values.
fn py_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => obj_eq(x, y),
        _ => match (num(a), num(b)) {
            (Some(Num::Int(x)), Some(Num::Int(y))) => x == y,
            (Some(Num::Float(x)), Some(Num::Float(y))) => x == y,
            (Some(Num::Int(x)), Some(Num::Float(y))) | (Some(Num::Float(y)), Some(Num::Int(x))) => {
                int_eq_float(x, y)
            }
            _ => false,
        },
    }
}

fn obj_eq(x: &Map<String, Value>, y: &Map<String, Value>) -> bool {
    x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| py_eq(v, w)))
}

/// The body as serde writes it: the receipt minus id and signature, null and empty lists.
fn normal_eq(body: &Map<String, Value>, receipt: &Map<String, Value>) -> bool {
    let mut kept = 0;
    for (k, v) in receipt {
        if k == "id" || k == "signature" || v.is_null() || v.as_array().is_some_and(Vec::is_empty) {
            continue;
        }
        kept += 1;
        if !body.get(k).is_some_and(|w| py_eq(w, v)) {
            return false;
        }
    }
    kept == body.len()
}

/// `bytes.fromhex(text)`: pairs of hex digits, ASCII whitespace between pairs skipped.
fn from_hex(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 2);
    let mut i = 0;
    let digit = |c: u8| (c as char).to_digit(16).filter(|_| c.is_ascii());
    loop {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            i += 1;
        }
        if i >= b.len() {
            return Some(out);
        }
        let high = digit(b[i])?;
        let low = digit(*b.get(i + 1)?)?;
        out.push((high * 16 + low) as u8);
        i += 2;
    }
}

fn get<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key)
}

fn is_str(value: Option<&Value>, text: &str) -> bool {
    matches!(value, Some(Value::String(s)) if s == text)
}

// ---------------------------------------------------------------- the check

/// A receipt's signature to verify: its key and signature.
type KeySig = ([u8; 32], [u8; 64]);

/// A check's result before the signatures are settled.
struct Pending {
    /// Why the item is refused, assuming its signature holds: (detail, untrusted key).
    refusal: Option<(String, Option<String>)>,
    /// The receipt's signature, when it has one to verify: (key, signature).
    signature: Option<([u8; 32], [u8; 64])>,
}

fn refused(detail: impl Into<String>) -> Pending {
    Pending {
        refusal: Some((detail.into(), None)),
        signature: None,
    }
}

/// `check_signed_receipt`, then the step's or the outcome's own checks.
fn check(input: &Input, trusted: Option<&HashSet<String>>) -> Pending {
    let text = match &input.receipt {
        Ok(text) => text,
        Err(detail) => return refused(detail.clone()),
    };
    let receipt: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return refused(format!("chio_receipt is not JSON: {e}")),
    };
    let Value::Object(receipt) = receipt else {
        return refused("chio_receipt is not a JSON object");
    };
    let claimed = match receipt.get("id") {
        Some(Value::String(s)) if s.chars().count() == 64 => s,
        _ => return refused("chio_receipt has no receipt id"),
    };
    let signed: &[u8] = input.signed.as_deref().unwrap_or(b"");
    let mut suffix = b",\"id\":\"".to_vec();
    suffix.extend(
        claimed
            .chars()
            .map(|c| if c.is_ascii() { c as u8 } else { b'?' }),
    );
    suffix.extend_from_slice(b"\"}");
    if signed.len() <= BODY_PREFIX.len() + ID_SUFFIX_LEN
        || !signed.starts_with(BODY_PREFIX)
        || signed[signed.len() - ID_SUFFIX_LEN..] != suffix[..]
    {
        return refused("chio_signed is not the signed message of this receipt");
    }
    let body_json = &signed[BODY_PREFIX.len()..signed.len() - ID_SUFFIX_LEN];
    if sha256_hex(body_json) != *claimed {
        return refused("the receipt id is not the hash of the signed body");
    }
    let body = match serde_json::from_slice::<Value>(body_json) {
        Ok(Value::Object(body)) => body,
        Ok(_) => return refused("chio_receipt differs from the body it claims was signed"),
        Err(_) => return refused("chio_signed does not hold a JSON body"),
    };
    if !normal_eq(&body, &receipt) {
        return refused("chio_receipt differs from the body it claims was signed");
    }
    // The key: 64 hex digits after an optional 0x (lower-cased); the signature as fromhex reads
    // it. Anything else does not verify.
    let key_hex = match body.get("kernel_key") {
        Some(Value::String(s)) => s.strip_prefix("0x").unwrap_or(s).to_ascii_lowercase(),
        _ => String::new(),
    };
    let key: Option<[u8; 32]> = (key_hex.len() == 64
        && key_hex.bytes().all(|c| c.is_ascii_hexdigit()))
    .then(|| from_hex(&key_hex))
    .flatten()
    .and_then(|k| k.try_into().ok());
    let sig: Option<[u8; 64]> = match receipt.get("signature") {
        Some(Value::String(s)) => {
            from_hex(s.strip_prefix("0x").unwrap_or(s)).and_then(|raw| raw.try_into().ok())
        }
        _ => None,
    };
    let (Some(key), Some(sig)) = (key, sig) else {
        return refused(SIGNATURE_REFUSAL);
    };
    let mut pending = Pending {
        refusal: None,
        signature: Some((key, sig)),
    };
    if let Some(trusted) = trusted {
        if !trusted.contains(&key_hex) {
            pending.refusal = Some((
                format!("kernel_key {}… is not a trusted signer", &key_hex[..16]),
                Some(key_hex),
            ));
            return pending;
        }
    }
    pending.refusal = match input.kind {
        Kind::Step => step_checks(&body, input),
        Kind::Outcome => outcome_checks(&body, input),
        Kind::Signed => None,
    }
    .map(|detail| (detail, None));
    pending
}

fn parameter_refusal(action: &Map<String, Value>) -> Option<String> {
    let parameters = action.get("parameters").unwrap_or(&Value::Null);
    match canonicalize(parameters) {
        Ok(canonical) => (!is_str(
            action.get("parameter_hash"),
            &sha256_hex(canonical.as_bytes()),
        ))
        .then(|| "parameter_hash does not match the receipt's parameters".to_string()),
        Err(e) => Some(format!(
            "the receipt's parameters have no canonical form: {e}"
        )),
    }
}

fn bound_to(body: &Map<String, Value>, input: &Input) -> bool {
    let context = match body.get("metadata") {
        Some(Value::Object(metadata)) => metadata.get("receipt_context"),
        _ => None,
    };
    match context {
        Some(Value::Object(context)) => is_str(
            context.get("request_id"),
            &request_id(input.prefix, &input.bound),
        ),
        _ => false,
    }
}

fn names_refusal(body: &Map<String, Value>, input: &Input) -> Option<&'static str> {
    if !input.capability_id.eq_json(get(body, "capability_id")) {
        return Some("the Chio receipt names another capability");
    }
    if !input.tool_server.eq_json(get(body, "tool_server"))
        || !input.tool.eq_json(get(body, "tool_name"))
    {
        return Some("the Chio receipt names another tool");
    }
    None
}

/// `chio_verdict`: the step verdict a receipt's decision stands for.
fn chio_verdict(body: &Map<String, Value>) -> &'static str {
    let verdict = match body.get("decision") {
        Some(Value::Object(decision)) => decision.get("verdict"),
        _ => None,
    };
    match verdict {
        Some(Value::String(v)) if v == "deny" => {
            let approval = match body.get("metadata") {
                Some(Value::Object(metadata)) => metadata.get("approval"),
                _ => None,
            };
            match approval {
                Some(Value::Object(approval))
                    if is_str(approval.get("state"), "approval_required") =>
                {
                    "PENDING_APPROVAL"
                }
                _ => "DENY",
            }
        }
        Some(Value::String(v)) if v == "allow" || v == "incomplete" => "ALLOW",
        _ => "UNKNOWN",
    }
}

fn step_checks(body: &Map<String, Value>, input: &Input) -> Option<String> {
    let Some(Value::Object(action)) = body.get("action") else {
        return Some("the Chio receipt has no action".to_string());
    };
    let redaction = body.get("redaction_mode");
    if redaction.is_none() || is_str(redaction, "none") {
        if let Some(refusal) = parameter_refusal(action) {
            return Some(refusal);
        }
    }
    if !bound_to(body, input) {
        return Some("the Chio receipt is not bound to this step's Temporal context".to_string());
    }
    if let Some(refusal) = names_refusal(body, input) {
        return Some(refusal.to_string());
    }
    let (verdict, reason) = input.verdict.as_ref().expect("a step");
    if chio_verdict(body) != *verdict {
        return Some("the Chio receipt's decision is not the step's verdict".to_string());
    }
    if *verdict == "DENY" || *verdict == "PENDING_APPROVAL" {
        let matches = match body.get("decision") {
            Some(Value::Object(decision)) => match decision.get("reason") {
                None => reason.as_str() == Some(""),
                Some(signed) => reason.eq_json(Some(signed)),
            },
            _ => false,
        };
        if !matches {
            return Some(
                "the step's deny reason is not the one the Chio receipt signed".to_string(),
            );
        }
    }
    None
}

fn outcome_checks(body: &Map<String, Value>, input: &Input) -> Option<String> {
    if !is_str(body.get("receipt_kind"), "trace_observation") || body.contains_key("decision") {
        return Some("the outcome's Chio receipt is not a trace observation".to_string());
    }
    if !bound_to(body, input) {
        return Some("the Chio receipt is not bound to this outcome record".to_string());
    }
    names_refusal(body, input).map(str::to_string)
}

// ---------------------------------------------------------------- batches

/// An item's Avro signature: none to check, a body that is not signed, or the triple.
#[derive(FromPyObject)]
enum Avro {
    Triple(PyBackedBytes, PyBackedBytes, PyBackedBytes),
    Flag(Option<bool>),
}

struct Item {
    avro: Option<Result<(PyBackedBytes, PyBackedBytes, PyBackedBytes), ()>>,
    chio: Result<Option<Input>, String>,
}

/// An item's verdict: it holds, its Avro signature fails, or the refusal of its receipt.
enum Verdict {
    Holds,
    BadAvro,
    Refused(String, Option<String>),
}

type Triple<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// The verdicts of a batch, each with its receipt's signature (key, signature) when it has one.
fn run(
    items: &[Item],
    trusted: Option<&HashSet<String>>,
    defer: bool,
) -> Vec<(Verdict, Option<KeySig>)> {
    let pending: Vec<Option<Pending>> = items
        .iter()
        .map(|item| match &item.chio {
            Ok(Some(input)) => Some(check(input, trusted)),
            Ok(None) => None,
            Err(detail) => Some(refused(detail.clone())),
        })
        .collect();
    // Every signature of the batch, Avro and Chio, in one list.
    let mut triples: Vec<Triple<'_>> = Vec::new();
    let mut index: Vec<(Option<usize>, Option<usize>)> = Vec::with_capacity(items.len());
    for (item, pending) in items.iter().zip(&pending) {
        let avro = match &item.avro {
            Some(Ok((k, m, s))) if !defer => {
                triples.push((k, m, s));
                Some(triples.len() - 1)
            }
            _ => None,
        };
        let chio = match (pending, &item.chio) {
            (
                Some(Pending {
                    signature: Some((key, sig)),
                    ..
                }),
                Ok(Some(input)),
            ) if !defer => {
                triples.push((key, input.signed.as_deref().unwrap_or(b""), sig));
                Some(triples.len() - 1)
            }
            _ => None,
        };
        index.push((avro, chio));
    }
    let valid = verify_all(&triples, CHUNK);
    items
        .iter()
        .zip(pending)
        .zip(index)
        .map(|((item, pending), (avro, chio))| {
            if !defer && (matches!(item.avro, Some(Err(()))) || avro.is_some_and(|i| !valid[i])) {
                return (Verdict::BadAvro, None);
            }
            if chio.is_some_and(|i| !valid[i]) {
                return (Verdict::Refused(SIGNATURE_REFUSAL.to_string(), None), None);
            }
            let Some(pending) = pending else {
                return (Verdict::Holds, None);
            };
            let verdict = match pending.refusal {
                None => Verdict::Holds,
                Some((detail, key)) => Verdict::Refused(detail, key),
            };
            (verdict, pending.signature)
        })
        .collect()
}

fn trusted_set(trusted: Option<&Bound<'_, PyAny>>) -> PyResult<Option<HashSet<String>>> {
    match trusted {
        None => Ok(None),
        Some(keys) if keys.is_none() => Ok(None),
        Some(keys) => keys
            .try_iter()?
            .map(|k| k?.extract::<String>())
            .collect::<PyResult<HashSet<_>>>()
            .map(Some),
    }
}

fn finish<'py>(
    py: Python<'py>,
    items: Vec<Item>,
    trusted: Option<HashSet<String>>,
    defer: bool,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let verdicts = py.detach(|| run(&items, trusted.as_ref(), defer));
    verdicts
        .into_iter()
        .zip(&items)
        .map(|((verdict, signature), item)| {
            let value = match verdict {
                Verdict::Holds => py.None().into_bound(py),
                Verdict::BadAvro => PyBool::new(py, false).to_owned().into_any(),
                Verdict::Refused(detail, key) => (detail, key).into_pyobject(py)?.into_any(),
            };
            if !defer {
                return Ok(value);
            }
            let triple = match (signature, &item.chio) {
                (Some((key, sig)), Ok(Some(input))) => (
                    PyBytes::new(py, &key),
                    PyBytes::new(py, input.signed.as_deref().unwrap_or(b"")),
                    PyBytes::new(py, &sig),
                )
                    .into_pyobject(py)?
                    .into_any(),
                _ => py.None().into_bound(py),
            };
            Ok((value, triple).into_pyobject(py)?.into_any())
        })
        .collect()
}

/// check_steps(items, trusted_keys=None, defer=False) -> list
///
/// The Chio check of each step (``schemas.check_chio_step``) and its Avro signature, all
/// Ed25519 signatures verified in one batch. ``items``: ``(record, avro)`` pairs; ``record`` a
/// plain step record (dict) or a ``StepReceipt``; ``avro`` ``None`` (no Avro signature to
/// check), ``False`` (a body that is not signed) or ``(public_key, message, signature)``.
/// ``trusted_keys``: lowercase hex keys allowed to sign receipts (``None``: any).
///
/// Per item: ``None`` (it holds; also a step without a Chio receipt whose Avro signature holds),
/// ``False`` (its Avro signature does not verify), or ``(detail, untrusted_key)``: why its
/// receipt is refused, ``untrusted_key`` set (lowercase hex) when the reason is that the signer
/// is not trusted. A record that cannot be read is refused with ``"the step record is not
/// readable: ..."`` (the text after the colon is this module's, not Python's).
///
/// ``defer=True`` verifies no signature: each item is ``(verdict, triple)`` with the verdict
/// assuming the receipt's signature holds and ``triple`` its ``(key, message, signature)``
/// (``None`` when the receipt has none to verify); Avro signatures are ignored.
#[pyfunction]
#[pyo3(signature = (items, trusted_keys = None, defer = false))]
pub(crate) fn check_steps<'py>(
    py: Python<'py>,
    items: &Bound<'py, PyAny>,
    trusted_keys: Option<&Bound<'py, PyAny>>,
    defer: bool,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let trusted = trusted_set(trusted_keys)?;
    let mut read = Vec::new();
    for item in items.try_iter()? {
        let item = item?;
        let (record, avro): (Bound<'py, PyAny>, Avro) = item.extract()?;
        let avro = match avro {
            Avro::Triple(k, m, s) => Some(Ok((k, m, s))),
            Avro::Flag(Some(false)) => Some(Err(())),
            Avro::Flag(_) => None,
        };
        let chio = step_input(&record).map_err(|e| format!("the step record is not readable: {e}"));
        read.push(Item { avro, chio });
    }
    finish(py, read, trusted, defer)
}

/// check_outcomes(records, statuses, trusted_keys=None, defer=False) -> list
///
/// The Chio check of each outcome record (``schemas.check_chio_outcome``), their signatures
/// verified in one batch. ``records``: plain outcome records (dicts) or ``StepOutcome``s;
/// ``statuses``: the ``StepStatus`` symbols (any other reads as ``UNKNOWN``). A record without
/// a receipt is ``None`` here. Results and ``defer`` as for :func:`check_steps`.
#[pyfunction]
#[pyo3(signature = (records, statuses, trusted_keys = None, defer = false))]
pub(crate) fn check_outcomes<'py>(
    py: Python<'py>,
    records: &Bound<'py, PyAny>,
    statuses: HashSet<String>,
    trusted_keys: Option<&Bound<'py, PyAny>>,
    defer: bool,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let trusted = trusted_set(trusted_keys)?;
    let mut read = Vec::new();
    for record in records.try_iter()? {
        let record = record?;
        let chio = outcome_input(&record, &statuses)
            .map_err(|e| format!("the outcome record is not readable: {e}"));
        read.push(Item { avro: None, chio });
    }
    finish(py, read, trusted, defer)
}

/// check_signed(chio_receipt, signed, trusted_keys=None, defer=False)
///
/// ``schemas.check_signed_receipt``'s checks of a carried receipt (``chio_receipt`` its JSON
/// text, ``signed`` the bytes its signature covers): ``None`` when they hold, else
/// ``(detail, untrusted_key)``; ``defer`` as for :func:`check_steps`.
#[pyfunction]
#[pyo3(signature = (chio_receipt, signed, trusted_keys = None, defer = false))]
pub(crate) fn check_signed<'py>(
    py: Python<'py>,
    chio_receipt: &Bound<'py, PyAny>,
    signed: PyBackedBytes,
    trusted_keys: Option<&Bound<'py, PyAny>>,
    defer: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let trusted = trusted_set(trusted_keys)?;
    let input = Input {
        receipt: read_receipt(chio_receipt),
        signed: Some(signed),
        bound: Vec::new(),
        prefix: "",
        capability_id: Py::Null,
        tool_server: Py::Null,
        tool: Py::Null,
        verdict: None,
        kind: Kind::Signed,
    };
    let item = Item {
        avro: None,
        chio: Ok(Some(input)),
    };
    let mut out = finish(py, vec![item], trusted, defer)?;
    Ok(out.remove(0))
}

/// step_request_id(step) -> str: the ``request_id`` binding a receipt to a step's Temporal
/// context (``schemas.request_id_for``); ``step`` a ``StepReceipt`` or a plain record.
#[pyfunction]
pub(crate) fn step_request_id(step: &Bound<'_, PyAny>) -> PyResult<String> {
    let mut bound = bound_values(step, &STEP_BOUND).map_err(PyTypeError::new_err)?;
    let prev = match field(step, "prev_hash", Missing::NoBytes).map_err(PyTypeError::new_err)? {
        None => String::new(),
        Some(value) => hex(&value.extract::<PyBackedBytes>()?),
    };
    bound.push(Py::Owned(prev));
    Ok(request_id(REQUEST_ID_PREFIX, &bound))
}

/// outcome_request_id(outcome, statuses) -> str: the ``request_id`` binding an outcome
/// receipt to every field of its record (``schemas.outcome_request_id``).
#[pyfunction]
pub(crate) fn outcome_request_id(
    outcome: &Bound<'_, PyAny>,
    statuses: HashSet<String>,
) -> PyResult<String> {
    let mut bound = bound_values(outcome, &OUTCOME_BOUND).map_err(PyTypeError::new_err)?;
    let status = bound[OUTCOME_STATUS]
        .as_str()
        .filter(|s| statuses.contains(*s))
        .map_or_else(|| "UNKNOWN".to_string(), str::to_owned);
    bound[OUTCOME_STATUS] = Py::Owned(status);
    Ok(request_id(OUTCOME_REQUEST_ID_PREFIX, &bound))
}
