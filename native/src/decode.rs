//! Batch decoding of framed Avro events into the plain records the consumer works with.
//!
//! A [`PlainDecoder`] is built from the consumer's *plain* schemas (the current schemas with
//! their logical types stripped: ids stay strings, timestamps int microseconds) and the
//! fingerprints each one is framed with. `decode_batch` reads Avro single-object messages
//! (`C3 01` + 8-byte CRC-64-AVRO fingerprint + schemaless body) with the GIL released, then
//! builds the Python records: the same dicts fastavro's `schemaless_reader` returns for those
//! schemas, with the checks of `schemas.read_body` (trailing bytes, Avro `int` range).
//!
//! Each message gets one of:
//! * `OK`: the record (a dict) and the body;
//! * `UNKNOWN_FORMAT`, `UNKNOWN_SCHEMA`, `MALFORMED`: a data error and its detail, the classes of
//!   `schemas.DecodeError` the library reader raises for the same bytes;
//! * `DEFER`: bytes this decoder does not settle; the caller reads them with the library reader
//!   (fastavro): a Confluent frame (first byte 00), a writer schema that needs resolution (a
//!   released version), and the few encodings whose reading in fastavro is not defined by the
//!   Avro specification (a varint longer than ten bytes, a block count of -2^63, nesting deeper
//!   than [`MAX_DEPTH`], a huge count of zero-width items, a fixed cut short).
//!
//! What fastavro does with odd input, and this decoder with it (a property test compares them):
//! a length past the end of the body, or a negative one, is an error; an enum or union index is
//! a Python list index (-1 is the last symbol); a boolean is any non-zero byte; an `int` is read
//! as a `long` and its range checked after the whole record.
use std::collections::{HashMap, HashSet};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple};
use serde_json::Value as Json;

const MAGIC: [u8; 2] = [0xc3, 0x01];
const HEADER: usize = 10;
/// Nesting deeper than this is left to the library reader.
const MAX_DEPTH: usize = 64;

/// Result codes of `decode_batch`.
const OK: u8 = 0;
const DEFER: u8 = 1;
const UNKNOWN_FORMAT: u8 = 2;
const UNKNOWN_SCHEMA: u8 = 3;
const MALFORMED: u8 = 4;

/// One node of a parsed schema; children are indices into the decoder's node list.
#[derive(Clone, Debug)]
enum Node {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    Str,
    Fixed(usize),
    Enum(usize),
    Array(usize),
    Map(usize),
    Union(Vec<usize>),
    Record(Vec<usize>),
    /// A named type being parsed (its fields may refer to it).
    Pending,
}

const PRIMITIVES: [(&str, Node); 8] = [
    ("null", Node::Null),
    ("boolean", Node::Boolean),
    ("int", Node::Int),
    ("long", Node::Long),
    ("float", Node::Float),
    ("double", Node::Double),
    ("bytes", Node::Bytes),
    ("string", Node::Str),
];

/// The schemas, parsed into nodes; field names and enum symbols kept by node.
#[derive(Default)]
struct Tree {
    nodes: Vec<Node>,
    named: HashMap<String, usize>,
    /// Per record node: its field names.
    fields: HashMap<usize, Vec<String>>,
    /// Per enum node: its symbols.
    symbols: HashMap<usize, Vec<String>>,
}

fn full_name(obj: &serde_json::Map<String, Json>, ns: &str) -> Result<(String, String), String> {
    let name = obj
        .get("name")
        .and_then(Json::as_str)
        .ok_or("a named type without a name")?;
    if name.contains('.') {
        let space = name.rsplit_once('.').map_or("", |(s, _)| s);
        return Ok((name.to_string(), space.to_string()));
    }
    let space = obj.get("namespace").and_then(Json::as_str).unwrap_or(ns);
    let full = if space.is_empty() {
        name.to_string()
    } else {
        format!("{space}.{name}")
    };
    Ok((full, space.to_string()))
}

impl Tree {
    fn new() -> Self {
        let mut tree = Self::default();
        for (_, node) in PRIMITIVES {
            tree.nodes.push(node);
        }
        tree
    }

    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn reference(&self, name: &str, ns: &str) -> Result<usize, String> {
        if let Some(i) = PRIMITIVES.iter().position(|(p, _)| *p == name) {
            return Ok(i);
        }
        if !name.contains('.') && !ns.is_empty() {
            if let Some(&id) = self.named.get(&format!("{ns}.{name}")) {
                return Ok(id);
            }
        }
        self.named
            .get(name)
            .copied()
            .ok_or_else(|| format!("unknown type {name:?}"))
    }

    fn define(&mut self, full: String) -> Result<usize, String> {
        if self.named.contains_key(&full) {
            return Err(format!("type {full:?} defined twice"));
        }
        let id = self.push(Node::Pending);
        self.named.insert(full, id);
        Ok(id)
    }

    fn parse(&mut self, json: &Json, ns: &str) -> Result<usize, String> {
        match json {
            Json::String(name) => self.reference(name, ns),
            Json::Array(branches) => {
                let ids = branches
                    .iter()
                    .map(|b| self.parse(b, ns))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(self.push(Node::Union(ids)))
            }
            Json::Object(obj) => {
                let kind = obj.get("type").ok_or("a schema object without a type")?;
                let Json::String(kind) = kind else {
                    return self.parse(kind, ns);
                };
                match kind.as_str() {
                    "record" | "error" => {
                        let (full, space) = full_name(obj, ns)?;
                        let id = self.define(full)?;
                        let list = obj
                            .get("fields")
                            .and_then(Json::as_array)
                            .ok_or("a record without fields")?;
                        let mut names = Vec::with_capacity(list.len());
                        let mut types = Vec::with_capacity(list.len());
                        for field in list {
                            let name = field
                                .get("name")
                                .and_then(Json::as_str)
                                .ok_or("a field without a name")?;
                            let ty = field.get("type").ok_or("a field without a type")?;
                            names.push(name.to_string());
                            types.push(self.parse(ty, &space)?);
                        }
                        self.nodes[id] = Node::Record(types);
                        self.fields.insert(id, names);
                        Ok(id)
                    }
                    "enum" => {
                        let (full, _) = full_name(obj, ns)?;
                        let id = self.define(full)?;
                        let symbols = obj
                            .get("symbols")
                            .and_then(Json::as_array)
                            .ok_or("an enum without symbols")?
                            .iter()
                            .map(|s| {
                                s.as_str()
                                    .map(str::to_string)
                                    .ok_or("a symbol not a string")
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        self.nodes[id] = Node::Enum(symbols.len());
                        self.symbols.insert(id, symbols);
                        Ok(id)
                    }
                    "fixed" => {
                        let (full, _) = full_name(obj, ns)?;
                        let size = obj
                            .get("size")
                            .and_then(Json::as_u64)
                            .ok_or("a fixed without a size")?;
                        let id = self.define(full)?;
                        self.nodes[id] = Node::Fixed(size as usize);
                        Ok(id)
                    }
                    "array" => {
                        let items =
                            self.parse(obj.get("items").ok_or("an array without items")?, ns)?;
                        Ok(self.push(Node::Array(items)))
                    }
                    "map" => {
                        let values =
                            self.parse(obj.get("values").ok_or("a map without values")?, ns)?;
                        Ok(self.push(Node::Map(values)))
                    }
                    other => self.reference(other, ns),
                }
            }
            _ => Err("a schema is a string, a list or an object".to_string()),
        }
    }

    /// True when a value of `id` may take no bytes at all (a huge count of them is deferred).
    fn zero_width(&self, id: usize, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            return true;
        }
        match &self.nodes[id] {
            Node::Null | Node::Pending => true,
            Node::Fixed(size) => *size == 0,
            Node::Record(types) => types.iter().all(|&t| self.zero_width(t, depth + 1)),
            _ => false,
        }
    }
}

/// A decoded value; strings and bytes are ranges of the body.
enum Val {
    Null,
    Bool(bool),
    Long(i64),
    Float(f32),
    Double(f64),
    Bytes(usize, usize),
    Str(usize, usize),
    Symbol(usize, usize),
    List(Vec<Val>),
    Map(Vec<(usize, usize, Val)>),
    Record(usize, Vec<Val>),
}

enum Fail {
    Malformed(String),
    Defer,
}

fn eof(what: &str) -> Fail {
    Fail::Malformed(format!("EOFError: cannot read {what}"))
}

struct Reader<'a> {
    tree: &'a Tree,
    zero: &'a [bool],
    buf: &'a [u8],
    pos: usize,
    int_outside: bool,
}

/// Python list indexing: -n..n, negative from the end.
fn py_index(index: i64, len: usize) -> Option<usize> {
    let n = len as i64;
    if (0..n).contains(&index) {
        Some(index as usize)
    } else if (-n..0).contains(&index) {
        Some((index + n) as usize)
    } else {
        None
    }
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn long(&mut self) -> Result<i64, Fail> {
        let mut b = u64::from(self.byte().ok_or_else(|| eof("long"))?);
        let mut n = b & 0x7f;
        let mut shift = 7u32;
        while b & 0x80 != 0 {
            if shift >= 64 {
                return Err(Fail::Defer);
            }
            b = u64::from(self.byte().ok_or_else(|| eof("long"))?);
            n |= (b & 0x7f) << shift;
            shift += 7;
        }
        Ok(((n >> 1) as i64) ^ -((n & 1) as i64))
    }

    /// `size` bytes: fewer left, or a negative size, is an `EOFError` in fastavro.
    fn take(&mut self, size: i64) -> Result<(usize, usize), Fail> {
        let rest = self.buf.len() - self.pos;
        match usize::try_from(size) {
            Ok(n) if n <= rest => {
                let start = self.pos;
                self.pos += n;
                Ok((start, self.pos))
            }
            _ => Err(Fail::Malformed(format!(
                "EOFError: Expected {size} bytes, read {}",
                if size < 0 {
                    rest
                } else {
                    rest.min(size as usize)
                }
            ))),
        }
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Fail> {
        let end = self.pos + N;
        let bytes = self.buf.get(self.pos..end).ok_or_else(|| eof(what))?;
        self.pos = end;
        Ok(bytes.try_into().expect("N bytes"))
    }

    /// A block count of an array or map: (items in the block), after its byte size if any.
    fn block(&mut self, item: usize) -> Result<i64, Fail> {
        let mut count = self.long()?;
        if count < 0 {
            if count == i64::MIN {
                return Err(Fail::Defer);
            }
            count = -count;
            self.long()?;
        }
        if self.zero[item] && count as u64 > (self.buf.len() - self.pos) as u64 {
            return Err(Fail::Defer);
        }
        Ok(count)
    }

    fn read(&mut self, id: usize, depth: usize) -> Result<Val, Fail> {
        if depth > MAX_DEPTH {
            return Err(Fail::Defer);
        }
        let tree = self.tree;
        Ok(match &tree.nodes[id] {
            Node::Null | Node::Pending => Val::Null,
            Node::Boolean => Val::Bool(self.byte().ok_or_else(|| eof("boolean"))? != 0),
            Node::Int => {
                let v = self.long()?;
                if i32::try_from(v).is_err() {
                    self.int_outside = true;
                }
                Val::Long(v)
            }
            Node::Long => Val::Long(self.long()?),
            Node::Float => Val::Float(f32::from_le_bytes(self.fixed::<4>("float")?)),
            Node::Double => Val::Double(f64::from_le_bytes(self.fixed::<8>("double")?)),
            Node::Bytes => {
                let size = self.long()?;
                let (a, b) = self.take(size)?;
                Val::Bytes(a, b)
            }
            Node::Str => {
                let size = self.long()?;
                let (a, b) = self.take(size)?;
                std::str::from_utf8(&self.buf[a..b]).map_err(|e| {
                    Fail::Malformed(format!("UnicodeDecodeError: invalid utf-8: {e}"))
                })?;
                Val::Str(a, b)
            }
            Node::Fixed(size) => {
                // A short fixed is not read the same way by every fastavro version.
                if self.buf.len() - self.pos < *size {
                    return Err(Fail::Defer);
                }
                let start = self.pos;
                self.pos += size;
                Val::Bytes(start, self.pos)
            }
            Node::Enum(len) => {
                let index = self.long()?;
                let i = py_index(index, *len).ok_or_else(|| {
                    Fail::Malformed(format!("IndexError: enum index {index} out of range"))
                })?;
                Val::Symbol(id, i)
            }
            Node::Union(branches) => {
                let index = self.long()?;
                let i = py_index(index, branches.len()).ok_or_else(|| {
                    Fail::Malformed(format!("IndexError: union index {index} out of range"))
                })?;
                self.read(branches[i], depth + 1)?
            }
            Node::Array(item) => {
                let mut items = Vec::new();
                let mut count = self.block(*item)?;
                while count != 0 {
                    for _ in 0..count {
                        items.push(self.read(*item, depth + 1)?);
                    }
                    count = self.block(*item)?;
                }
                Val::List(items)
            }
            Node::Map(value) => {
                let mut items = Vec::new();
                let mut count = self.block(*value)?;
                while count != 0 {
                    for _ in 0..count {
                        let size = self.long()?;
                        let (a, b) = self.take(size)?;
                        std::str::from_utf8(&self.buf[a..b]).map_err(|e| {
                            Fail::Malformed(format!("UnicodeDecodeError: invalid utf-8: {e}"))
                        })?;
                        items.push((a, b, self.read(*value, depth + 1)?));
                    }
                    count = self.block(*value)?;
                }
                Val::Map(items)
            }
            Node::Record(types) => {
                let mut values = Vec::with_capacity(types.len());
                for &t in types {
                    values.push(self.read(t, depth + 1)?);
                }
                Val::Record(id, values)
            }
        })
    }
}

/// The outcome of one message before any Python object exists.
enum Outcome {
    Ok { name: usize, value: Val },
    Code(u8, String),
}

/// A decoder of framed Avro events written with known (plain) schemas.
#[pyclass(frozen, module = "chio_receipts_native")]
pub struct PlainDecoder {
    tree: Tree,
    zero: Vec<bool>,
    /// Fingerprint -> (root node, index into `names`).
    roots: HashMap<[u8; 8], (usize, usize)>,
    /// Fingerprints of writer schemas the library reader resolves (released versions); None:
    /// every fingerprint not decoded here is left to it.
    known: Option<HashSet<[u8; 8]>>,
    names: Vec<Py<PyString>>,
    keys: HashMap<usize, Vec<Py<PyString>>>,
    symbols: HashMap<usize, Vec<Py<PyString>>>,
}

fn fingerprint(raw: &[u8]) -> PyResult<[u8; 8]> {
    raw.try_into()
        .map_err(|_| PyValueError::new_err("a fingerprint is 8 bytes"))
}

impl PlainDecoder {
    fn decode_one(&self, value: &[u8]) -> Outcome {
        if value.first() == Some(&0) {
            return Outcome::Code(DEFER, String::new());
        }
        if value.len() < HEADER || value[..2] != MAGIC {
            let shown: String = value.iter().take(2).map(|b| format!("{b:02x}")).collect();
            let shown = if shown.is_empty() {
                "none".to_string()
            } else {
                shown
            };
            return Outcome::Code(
                UNKNOWN_FORMAT,
                format!("not an Avro single-object message (first bytes {shown})"),
            );
        }
        let fp: [u8; 8] = value[2..HEADER].try_into().expect("8 bytes");
        let Some(&(root, name)) = self.roots.get(&fp) else {
            if self.known.as_ref().is_none_or(|known| known.contains(&fp)) {
                return Outcome::Code(DEFER, String::new());
            }
            let hex: String = fp.iter().map(|b| format!("{b:02x}")).collect();
            return Outcome::Code(
                UNKNOWN_SCHEMA,
                format!("unknown writer schema fingerprint {hex}"),
            );
        };
        let body = &value[HEADER..];
        let mut reader = Reader {
            tree: &self.tree,
            zero: &self.zero,
            buf: body,
            pos: 0,
            int_outside: false,
        };
        match reader.read(root, 0) {
            Err(Fail::Defer) => Outcome::Code(DEFER, String::new()),
            Err(Fail::Malformed(detail)) => Outcome::Code(MALFORMED, detail),
            Ok(_) if reader.pos != body.len() => Outcome::Code(
                MALFORMED,
                format!(
                    "{} trailing bytes after the record",
                    body.len() - reader.pos
                ),
            ),
            Ok(_) if reader.int_outside => Outcome::Code(
                MALFORMED,
                "a field is outside the Avro int range".to_string(),
            ),
            Ok(value) => Outcome::Ok { name, value },
        }
    }

    fn to_py<'py>(&self, py: Python<'py>, body: &[u8], value: &Val) -> PyResult<Bound<'py, PyAny>> {
        Ok(match value {
            Val::Null => py.None().into_bound(py),
            Val::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
            Val::Long(v) => v.into_pyobject(py)?.into_any(),
            Val::Float(v) => PyFloat::new(py, f64::from(*v)).into_any(),
            Val::Double(v) => PyFloat::new(py, *v).into_any(),
            Val::Bytes(a, b) => PyBytes::new(py, &body[*a..*b]).into_any(),
            Val::Str(a, b) => PyString::new(py, utf8(&body[*a..*b])).into_any(),
            Val::Symbol(node, i) => self.symbols[node][*i].bind(py).clone().into_any(),
            Val::List(items) => {
                let list = PyList::empty(py);
                for item in items {
                    list.append(self.to_py(py, body, item)?)?;
                }
                list.into_any()
            }
            Val::Map(items) => {
                let dict = PyDict::new(py);
                for (a, b, item) in items {
                    dict.set_item(utf8(&body[*a..*b]), self.to_py(py, body, item)?)?;
                }
                dict.into_any()
            }
            Val::Record(node, values) => {
                let dict = PyDict::new(py);
                for (key, item) in self.keys[node].iter().zip(values) {
                    dict.set_item(key.bind(py), self.to_py(py, body, item)?)?;
                }
                dict.into_any()
            }
        })
    }
}

fn utf8(bytes: &[u8]) -> &str {
    // Checked while decoding.
    std::str::from_utf8(bytes).unwrap_or_default()
}

#[pymethods]
impl PlainDecoder {
    /// Result code: decoded (schema name, record, body).
    #[classattr]
    const OK: u8 = OK;
    /// Result code: not settled here, read it with the library reader.
    #[classattr]
    const DEFER: u8 = DEFER;
    /// Result code: neither single-object nor Confluent framing (``UnknownFormat``).
    #[classattr]
    const UNKNOWN_FORMAT: u8 = UNKNOWN_FORMAT;
    /// Result code: a fingerprint of no known writer schema (``UnknownSchema``).
    #[classattr]
    const UNKNOWN_SCHEMA: u8 = UNKNOWN_SCHEMA;
    /// Result code: the body does not decode (``MalformedBody``).
    #[classattr]
    const MALFORMED: u8 = MALFORMED;

    /// PlainDecoder(schemas, known=None)
    ///
    /// ``schemas``: ``(name, schema_json, fingerprints)`` in dependency order (a schema may
    /// refer to the named types of those before it); each is decoded natively when framed
    /// with one of its fingerprints. ``known``: fingerprints of other writer schemas, left to
    /// the library reader (``DEFER``), any other fingerprint being ``UNKNOWN_SCHEMA``; ``None``
    /// leaves every other fingerprint to the library reader.
    #[new]
    #[pyo3(signature = (schemas, known = None))]
    fn new(
        py: Python<'_>,
        schemas: Vec<(String, String, Vec<Vec<u8>>)>,
        known: Option<Vec<Vec<u8>>>,
    ) -> PyResult<Self> {
        let mut tree = Tree::new();
        let mut roots = HashMap::new();
        let mut names = Vec::new();
        for (name, text, fingerprints) in &schemas {
            let json: Json = serde_json::from_str(text)
                .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
            let root = tree
                .parse(&json, "")
                .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
            for fp in fingerprints {
                roots.insert(fingerprint(fp)?, (root, names.len()));
            }
            names.push(PyString::intern(py, name).unbind());
        }
        if tree.nodes.iter().any(|n| matches!(n, Node::Pending)) {
            return Err(PyValueError::new_err("a named type is not complete"));
        }
        let zero = (0..tree.nodes.len())
            .map(|i| tree.zero_width(i, 0))
            .collect();
        let known = known
            .map(|list| {
                list.iter()
                    .map(|fp| fingerprint(fp))
                    .collect::<PyResult<HashSet<_>>>()
            })
            .transpose()?;
        let intern = |list: &Vec<String>| -> Vec<Py<PyString>> {
            list.iter()
                .map(|s| PyString::intern(py, s).unbind())
                .collect()
        };
        let keys = tree.fields.iter().map(|(&id, f)| (id, intern(f))).collect();
        let symbols = tree
            .symbols
            .iter()
            .map(|(&id, s)| (id, intern(s)))
            .collect();
        Ok(Self {
            tree,
            zero,
            roots,
            known,
            names,
            keys,
            symbols,
        })
    }

    /// decode_batch(values) -> list[tuple[int, object, object, object]]
    ///
    /// Per message: ``(OK, schema_name, record, body)``, ``(DEFER, None, None, None)`` or
    /// ``(UNKNOWN_FORMAT | UNKNOWN_SCHEMA | MALFORMED, detail, None, None)``. The bytes are read
    /// with the GIL released; the records are built after.
    fn decode_batch<'py>(
        &self,
        py: Python<'py>,
        values: Vec<PyBackedBytes>,
    ) -> PyResult<Bound<'py, PyList>> {
        let outcomes: Vec<Outcome> =
            py.detach(|| values.iter().map(|v| self.decode_one(v)).collect());
        let out = PyList::empty(py);
        let none = py.None().into_bound(py);
        for (value, outcome) in values.iter().zip(outcomes) {
            let item = match outcome {
                Outcome::Ok { name, value: val } => {
                    let body = &value[HEADER..];
                    let name = self.names[name].bind(py).clone().into_any();
                    let record = self.to_py(py, body, &val)?;
                    let body = PyBytes::new(py, body).into_any();
                    PyTuple::new(py, [OK.into_pyobject(py)?.into_any(), name, record, body])?
                }
                Outcome::Code(code, detail) => {
                    let detail = if code == DEFER {
                        none.clone()
                    } else {
                        PyString::new(py, &detail).into_any()
                    };
                    PyTuple::new(
                        py,
                        [
                            code.into_pyobject(py)?.into_any(),
                            detail,
                            none.clone(),
                            none.clone(),
                        ],
                    )?
                }
            };
            out.append(item)?;
        }
        Ok(out)
    }
}
