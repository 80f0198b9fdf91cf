//! `chio_header_values`: the two values of a step's Chio headers (`X-Chio-Receipt`, the receipt's
//! id; `X-Chio-Verdict`, its decision's verdict) read from the receipt's JSON text in one pass,
//! without building the document.
//!
//! The scan validates the whole text as JSON (RFC 8259) and reads only the top-level `id` and
//! `decision.verdict` (the last of duplicate keys, as Python's `json.loads`). Whatever it does
//! not settle exactly as `schemas.chio_step_fields` would (a value that is not a plain string,
//! an escape in one of the two strings, text that is not JSON, a top level that is not an
//! object) returns `None`, and the caller takes the Python path.
use pyo3::prelude::*;
use pyo3::types::PyString;

struct Scan<'a> {
    s: &'a [u8],
    i: usize,
}

/// A value the scan read: a string without escapes (its bytes), null, or anything else.
enum Seen<'a> {
    Str(&'a [u8]),
    Null,
    Other,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while let Some(&c) = self.s.get(self.i) {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    /// A string at `i` (the opening quote); its raw bytes and whether it had an escape.
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        self.eat(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            let c = *self.s.get(self.i)?;
            match c {
                b'"' => {
                    let raw = &self.s[start..self.i];
                    self.i += 1;
                    return Some((raw, escaped));
                }
                b'\\' => {
                    escaped = true;
                    let e = *self.s.get(self.i + 1)?;
                    match e {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                        b'u' => {
                            let hex = self.s.get(self.i + 2..self.i + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.i += 6;
                        }
                        _ => return None,
                    }
                }
                0..=0x1f => return None,
                _ => self.i += 1,
            }
        }
    }

    fn digits(&mut self) -> Option<()> {
        let start = self.i;
        while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        (self.i > start).then_some(())
    }

    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        if self.eat(b'0').is_none() {
            match self.s.get(self.i) {
                Some(b'1'..=b'9') => self.digits()?,
                _ => return None,
            }
        }
        if self.eat(b'.').is_some() {
            self.digits()?;
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.digits()?;
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.s.get(self.i..self.i + word.len())? == word {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// Any value at `i`, validated.
    fn value(&mut self, depth: u32) -> Option<Seen<'a>> {
        if depth > 512 {
            return None;
        }
        self.ws();
        match *self.s.get(self.i)? {
            b'"' => {
                let (raw, escaped) = self.string()?;
                Some(if escaped { Seen::Other } else { Seen::Str(raw) })
            }
            b'{' => {
                self.object(depth, |_, _| {})?;
                Some(Seen::Other)
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.eat(b']').is_none() {
                    loop {
                        self.value(depth + 1)?;
                        self.ws();
                        if self.eat(b',').is_some() {
                            continue;
                        }
                        self.eat(b']')?;
                        break;
                    }
                }
                Some(Seen::Other)
            }
            b't' => self.literal(b"true").map(|()| Seen::Other),
            b'f' => self.literal(b"false").map(|()| Seen::Other),
            b'n' => self.literal(b"null").map(|()| Seen::Null),
            _ => self.number().map(|()| Seen::Other),
        }
    }

    /// An object at `i`; `each(key, value)` for each member (key `None` when it had an escape).
    fn object(
        &mut self,
        depth: u32,
        mut each: impl FnMut(Option<&'a [u8]>, Seen<'a>),
    ) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            self.ws();
            let (key, escaped) = self.string()?;
            self.ws();
            self.eat(b':')?;
            let seen = self.value(depth + 1)?;
            each((!escaped).then_some(key), seen);
            self.ws();
            if self.eat(b',').is_some() {
                continue;
            }
            self.eat(b'}')?;
            return Some(());
        }
    }
}

/// What one of the two values reads as, as `str(x or "")` would: `Some(text)`, or `None` when
/// only the Python path can say.
fn text_of(seen: &Seen<'_>) -> Option<String> {
    match seen {
        Seen::Str(raw) => std::str::from_utf8(raw).ok().map(str::to_owned),
        Seen::Null => Some(String::new()),
        Seen::Other => None,
    }
}

/// `(receipt id, verdict)` of the receipt JSON `text` ("" where absent), or `None`.
pub(crate) fn header_values(text: &str) -> Option<(String, String)> {
    let mut scan = Scan {
        s: text.as_bytes(),
        i: 0,
    };
    scan.ws();
    // Per key, the last occurrence: Ok(text), or Err(()) when only Python can settle it.
    let mut id: Result<String, ()> = Ok(String::new());
    let mut verdict: Result<String, ()> = Ok(String::new());
    let mut escaped_key = false;
    // The top level, with `decision`'s members seen by a nested scan.
    scan.eat(b'{')?;
    scan.ws();
    if scan.eat(b'}').is_none() {
        loop {
            scan.ws();
            let (key, escaped) = scan.string()?;
            escaped_key |= escaped;
            scan.ws();
            scan.eat(b':')?;
            scan.ws();
            if !escaped && key == b"decision" && scan.s.get(scan.i) == Some(&b'{') {
                let mut found: Result<String, ()> = Ok(String::new());
                let mut inner_escaped = false;
                scan.object(1, |k, seen| match k {
                    Some(b"verdict") => found = text_of(&seen).ok_or(()),
                    None => inner_escaped = true,
                    _ => {}
                })?;
                verdict = if inner_escaped { Err(()) } else { found };
            } else {
                let seen = scan.value(1)?;
                if !escaped && key == b"id" {
                    id = text_of(&seen).ok_or(());
                } else if !escaped && key == b"decision" {
                    // Not a mapping: no verdict.
                    verdict = Ok(String::new());
                }
            }
            scan.ws();
            if scan.eat(b',').is_some() {
                continue;
            }
            scan.eat(b'}')?;
            break;
        }
    }
    scan.ws();
    if scan.i != scan.s.len() || escaped_key {
        return None;
    }
    Some((id.ok()?, verdict.ok()?))
}

/// chio_header_values(text) -> tuple[str, str] | None
///
/// The Chio receipt id (top-level ``id``) and verdict (``decision.verdict``) of a receipt's JSON
/// text, ``""`` where absent or null; ``None`` when the text is not JSON this scan settles
/// exactly (see the module docs), so the caller parses it in Python.
#[pyfunction]
pub(crate) fn chio_header_values(text: &Bound<'_, PyString>) -> Option<(String, String)> {
    header_values(text.to_str().ok()?)
}
