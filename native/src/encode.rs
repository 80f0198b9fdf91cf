//! The gate's per-attempt encoding in compiled code: the step event's Avro body (encoded and
//! signed in one call) and the kernel's canonical JSON of Python values.
//!
//! * `encode_step` / `sign_step`: the schemaless Avro body of a `StepReceipt`
//!   (`schemas/avro/step_receipt.avsc`, fields in schema order), byte for byte what fastavro
//!   writes. `sign_step` writes the body with an empty signature, signs it with a native
//!   `Signer` and returns the signature and the wire body (the same bytes with the signature in
//!   place of the empty one), so the gate crosses into Rust once per attempt.
//! * `canonical_json_of`: chio-core-types' RFC 8785 canonical JSON of a Python value (what
//!   `json.loads` returns), without writing JSON text first.
//!
//! Values of a type the schema does not take as is make the encoders return `None`: the caller
//! then asks fastavro, which encodes them or raises as it always did.
use crate::Signer;
use chio_core_types::canonical::canonicalize;
use ed25519_dalek::{Signer as _, SigningKey};
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};

/// Avro's encoding of a 64-byte `bytes`: the zig-zag varint of 64, then the bytes.
const SIG_PREFIX: [u8; 2] = [0x80, 0x01];
const SIG_SIZE: usize = 64;
/// The step schema's `Verdict` symbols, in order.
const VERDICTS: [&str; 4] = ["UNKNOWN", "ALLOW", "DENY", "PENDING_APPROVAL"];

/// Zig-zag varint of an Avro `int` or `long`.
fn long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z > 0x7f {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn raw(out: &mut Vec<u8>, bytes: &[u8]) {
    long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

/// One field, or `None` when its value is not of a type this writer takes.
fn string(out: &mut Vec<u8>, value: &Bound<'_, PyAny>) -> Option<()> {
    let text = value.cast::<PyString>().ok()?.to_str().ok()?; // a lone surrogate: None
    raw(out, text.as_bytes());
    Some(())
}

fn int_in(value: &Bound<'_, PyAny>, min: i64, max: i64) -> Option<i64> {
    if value.is_instance_of::<PyBool>() || !value.is_instance_of::<PyInt>() {
        return None;
    }
    let n: i64 = value.extract().ok()?;
    (min..=max).contains(&n).then_some(n)
}

fn bytes_field(out: &mut Vec<u8>, value: &Bound<'_, PyAny>) -> Option<()> {
    raw(out, value.cast::<PyBytes>().ok()?.as_bytes());
    Some(())
}

fn string_array(out: &mut Vec<u8>, value: &Bound<'_, PyAny>) -> Option<()> {
    let write = |out: &mut Vec<u8>, items: &mut dyn ExactSizeIterator<Item = Bound<'_, PyAny>>| {
        let count = items.len();
        if count > 0 {
            // One block holding every item, then the empty block that ends the array.
            long(out, count as i64);
            for item in items {
                string(out, &item)?;
            }
        }
        out.push(0);
        Some(())
    };
    if let Ok(list) = value.cast::<PyList>() {
        write(out, &mut list.iter())
    } else if let Ok(tuple) = value.cast::<PyTuple>() {
        write(out, &mut tuple.iter())
    } else {
        None
    }
}

fn verdict(out: &mut Vec<u8>, value: &Bound<'_, PyAny>) -> Option<()> {
    // Verdict is a StrEnum: its string is its symbol, as fastavro reads it. A plain ``str`` is
    // left to fastavro (which takes a symbol too), as the record's field holds the enum.
    if value.is_exact_instance_of::<PyString>() {
        return None;
    }
    let symbol = value.cast::<PyString>().ok()?.to_str().ok()?;
    let index = VERDICTS.iter().position(|s| *s == symbol)?;
    long(out, index as i64);
    Some(())
}

/// The body of every field before `key_id`, read from the receipt's attributes.
fn step_fields(receipt: &Bound<'_, PyAny>) -> PyResult<Option<Vec<u8>>> {
    let py = receipt.py();
    let mut out = Vec::with_capacity(2048);
    macro_rules! get {
        ($name:literal) => {
            receipt.getattr(intern!(py, $name))?
        };
    }
    macro_rules! put {
        ($e:expr) => {
            if $e.is_none() {
                return Ok(None);
            }
        };
    }
    macro_rules! strings {
        ($($name:literal),+) => {
            $( put!(string(&mut out, &get!($name))); )+
        };
    }
    strings!(
        "receipt_id",
        "namespace",
        "workflow_id",
        "run_id",
        "workflow_type",
        "task_queue",
        "activity_id",
        "activity_type"
    );
    let attempt = int_in(&get!("attempt"), i32::MIN as i64, i32::MAX as i64);
    put!(attempt.map(|n| long(&mut out, n)));
    let is_local = get!("is_local");
    let local = is_local.cast_exact::<PyBool>().ok().map(|b| b.is_true());
    put!(local.map(|b| out.push(u8::from(b))));
    strings!(
        "tool_server",
        "tool",
        "action",
        "resource",
        "subject",
        "capability_id"
    );
    put!(string_array(&mut out, &get!("capability_chain")));
    put!(string_array(&mut out, &get!("scope")));
    put!(verdict(&mut out, &get!("verdict")));
    strings!("reason", "argument_digest", "argument_key_id");
    for name in [
        intern!(py, "scheduled_at"),
        intern!(py, "started_at"),
        intern!(py, "evaluated_at"),
        intern!(py, "latency_us"),
    ] {
        let n = int_in(&receipt.getattr(name)?, i64::MIN, i64::MAX);
        put!(n.map(|n| long(&mut out, n)));
    }
    strings!("worker_identity");
    put!(bytes_field(&mut out, &get!("prev_hash")));
    strings!("chio_receipt");
    put!(bytes_field(&mut out, &get!("chio_signed")));
    strings!("trace_id", "span_id");
    Ok(Some(out))
}

/// encode_step(receipt, key_id, signature) -> bytes | None
///
/// The schemaless Avro body of ``receipt`` (a ``StepReceipt``, read by attribute) with
/// ``key_id`` and ``signature`` in place of its own: the bytes fastavro writes. ``None`` when a
/// value is not of a type the schema takes as is (use fastavro then).
#[pyfunction]
pub fn encode_step<'py>(
    py: Python<'py>,
    receipt: &Bound<'py, PyAny>,
    key_id: &Bound<'py, PyAny>,
    signature: &[u8],
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let Some(mut out) = step_fields(receipt)? else {
        return Ok(None);
    };
    if string(&mut out, key_id).is_none() {
        return Ok(None);
    }
    raw(&mut out, signature);
    Ok(Some(PyBytes::new(py, &out)))
}

/// sign_step(receipt, key_id, signer) -> tuple[bytes, bytes] | None
///
/// Sign ``receipt`` as the step schema lays it out: the signed bytes are its body with
/// ``key_id`` and an empty signature; returns ``(signature, wire_body)``, the wire body being
/// those bytes with the 64-byte signature in place of the empty one (one encode, one
/// signature). ``None`` as for :func:`encode_step`.
#[pyfunction]
pub fn sign_step<'py>(
    py: Python<'py>,
    receipt: &Bound<'py, PyAny>,
    key_id: &Bound<'py, PyAny>,
    signer: &Bound<'py, Signer>,
) -> PyResult<Option<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)>> {
    let Some(mut out) = step_fields(receipt)? else {
        return Ok(None);
    };
    if string(&mut out, key_id).is_none() {
        return Ok(None);
    }
    out.push(0); // the empty signature
    let key = &signer.get().key;
    let (signature, body) = py.detach(|| seal(key, out));
    Ok(Some((
        PyBytes::new(py, &signature),
        PyBytes::new(py, &body),
    )))
}

/// Sign `body` (ending with the empty signature) with `key`; returns the signature and the
/// wire body.
fn seal(key: &SigningKey, mut body: Vec<u8>) -> ([u8; SIG_SIZE], Vec<u8>) {
    let signature = key.sign(&body).to_bytes();
    body.pop();
    body.extend_from_slice(&SIG_PREFIX);
    body.extend_from_slice(&signature);
    (signature, body)
}

// ------------------------------------------------------------------ canonical JSON of values

/// Deeper nesting is refused (a Python recursion limit used to stop it).
const MAX_DEPTH: usize = 900;

fn wire_error(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}

fn to_value(value: &Bound<'_, PyAny>, safe: bool, depth: usize) -> PyResult<serde_json::Value> {
    use serde_json::Value;
    if depth > MAX_DEPTH {
        return Err(wire_error("the value is nested too deeply"));
    }
    if value.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if let Ok(s) = value.cast::<PyString>() {
        let text = s
            .to_str()
            .map_err(|_| wire_error("a string holds a lone UTF-16 surrogate, which is not JSON"))?;
        return Ok(Value::String(text.to_owned()));
    }
    if value.is_instance_of::<PyInt>() {
        if let Ok(n) = value.extract::<i64>() {
            if safe && n.unsigned_abs() > (1u64 << 53) - 1 {
                return Err(wire_error(
                    "an integer is outside the I-JSON range +-(2**53 - 1)",
                ));
            }
            return Ok(Value::from(n));
        }
        if let Ok(n) = value.extract::<u64>() {
            if safe {
                return Err(wire_error(
                    "an integer is outside the I-JSON range +-(2**53 - 1)",
                ));
            }
            return Ok(Value::from(n));
        }
        return Err(wire_error("an integer does not fit a 64-bit JSON number"));
    }
    if let Ok(f) = value.cast::<PyFloat>() {
        let x = f.value();
        return serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| {
                wire_error("NaN and Infinity have no JSON form (they are not JSON numbers)")
            });
    }
    if let Ok(dict) = value.cast::<PyDict>() {
        let mut map = serde_json::Map::with_capacity(dict.len());
        for (key, item) in dict.iter() {
            let key = key
                .cast::<PyString>()
                .map_err(|_| wire_error("JSON object keys must be strings"))?
                .to_str()
                .map_err(|_| {
                    wire_error("a string holds a lone UTF-16 surrogate, which is not JSON")
                })?
                .to_owned();
            map.insert(key, to_value(&item, safe, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    if let Ok(list) = value.cast::<PyList>() {
        let mut items = Vec::with_capacity(list.len());
        for item in list.iter() {
            items.push(to_value(&item, safe, depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    if let Ok(tuple) = value.cast::<PyTuple>() {
        let mut items = Vec::with_capacity(tuple.len());
        for item in tuple.iter() {
            items.push(to_value(&item, safe, depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    if let Ok(mapping) = value.cast::<PyMapping>() {
        // Another Mapping (a MappingProxyType, ...): its items, as a dict would give them.
        let dict = PyDict::new(value.py());
        for item in mapping.items()?.iter() {
            let (key, item): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            dict.set_item(key, item)?;
        }
        return to_value(dict.as_any(), safe, depth);
    }
    let name = value.get_type().name()?;
    Err(wire_error(format!("a {name} has no JSON form")))
}

/// canonical_json_of(value, safe_integers=False) -> bytes
///
/// The kernel's RFC 8785 canonical JSON (chio-core-types ``canonicalize``) of a Python value:
/// ``None``, ``bool``, ``str``, ``int`` (64-bit), ``float`` (finite), dicts and other mappings
/// with ``str`` keys, lists and tuples. ``safe_integers=True`` also refuses integers beyond
/// 2^53-1 in magnitude, as the kernel's strict text path does. ``ValueError`` for a value with
/// no canonical form.
#[pyfunction]
#[pyo3(signature = (value, safe_integers = false))]
pub fn canonical_json_of<'py>(
    py: Python<'py>,
    value: &Bound<'py, PyAny>,
    safe_integers: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let tree = to_value(value, safe_integers, 0)?;
    let text = py
        .detach(|| canonicalize(&tree))
        .map_err(|e| wire_error(format!("no canonical JSON: {e}")))?;
    Ok(PyBytes::new(py, text.as_bytes()))
}
