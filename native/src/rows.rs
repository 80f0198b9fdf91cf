//! The analytics columns of step rows, a poll batch at a time.
//!
//! `chio_columns` reads, for each Chio receipt text of a batch, the columns of
//! `schemas.ChioStepFields` (in `consumers._rows.CHIO_COLUMNS` order) with one serde_json parse
//! and without the GIL. Each column is `str(value or "")` of the receipt's field: a string is
//! itself, an absent field, `null`, `false`, `[]` and `{}` are `""`, `true` is `"True"`. For
//! anything whose Python reading this module does not reproduce exactly (a number, a non-empty
//! array or object in a column, a receipt that is not a JSON object, text serde_json does not
//! read) the item is `None`, and the caller reads that receipt with Python's `json` instead.
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::PyTuple;
use serde_json::{Map, Value};

/// The receipt's top-level fields, in column order; then `decision.verdict`, `decision.guard`
/// and `action.parameter_hash`.
const TOP: [&str; 9] = [
    "id",
    "receipt_kind",
    "boundary_class",
    "trust_level",
    "tool_origin",
    "redaction_mode",
    "policy_hash",
    "content_hash",
    "kernel_key",
];
const WIDTH: usize = TOP.len() + 3;

/// `str(value or "")`, when it is one this module reproduces.
fn column(value: Option<&Value>) -> Option<String> {
    match value {
        None | Some(Value::Null | Value::Bool(false)) => Some(String::new()),
        Some(Value::Bool(true)) => Some("True".to_string()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) if a.is_empty() => Some(String::new()),
        Some(Value::Object(o)) if o.is_empty() => Some(String::new()),
        Some(_) => None,
    }
}

fn nested<'a>(receipt: &'a Map<String, Value>, key: &str) -> Option<&'a Map<String, Value>> {
    match receipt.get(key) {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    }
}

fn columns_of(text: &str) -> Option<Vec<String>> {
    let Ok(Value::Object(receipt)) = serde_json::from_str::<Value>(text) else {
        return None;
    };
    let mut out = Vec::with_capacity(WIDTH);
    for key in TOP {
        out.push(column(receipt.get(key))?);
    }
    let decision = nested(&receipt, "decision");
    out.push(column(decision.and_then(|d| d.get("verdict")))?);
    out.push(column(decision.and_then(|d| d.get("guard")))?);
    out.push(column(
        nested(&receipt, "action").and_then(|a| a.get("parameter_hash")),
    )?);
    Some(out)
}

/// chio_columns(texts) -> list[tuple[str, ...] | None]
///
/// The Chio analytics columns (``consumers._rows.CHIO_COLUMNS`` order) of each receipt text,
/// or ``None`` where the caller must read the receipt with Python (see the module's docs).
/// A text that is not a ``str`` (or not encodable as UTF-8) is ``None`` too.
#[pyfunction]
pub(crate) fn chio_columns<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let mut read: Vec<Option<PyBackedStr>> = Vec::new();
    for text in texts.try_iter()? {
        read.push(text?.extract::<PyBackedStr>().ok());
    }
    let columns: Vec<Option<Vec<String>>> = py.detach(|| {
        read.iter()
            .map(|text| text.as_deref().and_then(columns_of))
            .collect()
    });
    columns
        .into_iter()
        .map(|row| match row {
            None => Ok(py.None().into_bound(py)),
            Some(values) => Ok(PyTuple::new(py, values)?.into_any()),
        })
        .collect()
}
