//! The kernel's own verifier as a line filter: the oracle for the project's Python verifier.
//!
//! Usage: chio-receipt-verify [--receipts | --capabilities]
//!
//! Reads one JSON document per line on stdin and prints one verdict line per input line:
//! `valid`, or `invalid <reason>`. Blank input lines are echoed as blank output lines so the
//! output stays aligned with the input.
//!
//! * `--receipts` (default): deserialise as chio-core-types 0.1.2 `ChioReceipt`, then
//!   `ChioReceipt::verify_signature` (semantics, content-addressed id, Ed25519 over
//!   `{"id", "body"}`).
//! * `--capabilities`: deserialise as `CapabilityToken`, then `CapabilityToken::verify_signature`
//!   (schema, Ed25519 by the issuer over the signing body). No clock check: expiry is not part
//!   of the signature.
use std::{
    env,
    io::{self, BufRead, BufWriter, Write},
    process::ExitCode,
};

use chio_core_types::{capability::token::CapabilityToken, receipt::body::ChioReceipt};

#[derive(Clone, Copy)]
enum Mode {
    Receipts,
    Capabilities,
}

fn one_line(text: impl std::fmt::Display) -> String {
    text.to_string().replace(['\n', '\r'], " ")
}

fn verdict(mode: Mode, line: &str) -> String {
    let result = match mode {
        Mode::Receipts => serde_json::from_str::<ChioReceipt>(line)
            .map_err(|e| format!("parse: {e}"))
            .and_then(|r| r.verify_signature().map_err(|e| format!("verify: {e}"))),
        Mode::Capabilities => serde_json::from_str::<CapabilityToken>(line)
            .map_err(|e| format!("parse: {e}"))
            .and_then(|t| t.verify_signature().map_err(|e| format!("verify: {e}"))),
    };
    match result {
        Ok(true) => "valid".to_string(),
        Ok(false) => "invalid signature".to_string(),
        Err(reason) => format!("invalid {}", one_line(reason)),
    }
}

fn main() -> ExitCode {
    let mut mode = Mode::Receipts;
    for arg in env::args().skip(1) {
        match arg.as_str() {
            "--receipts" => mode = Mode::Receipts,
            "--capabilities" | "--tokens" => mode = Mode::Capabilities,
            _ => {
                eprintln!("usage: chio-receipt-verify [--receipts | --capabilities] < lines.jsonl");
                return ExitCode::from(2);
            }
        }
    }
    let stdin = io::stdin();
    let mut out = BufWriter::new(io::stdout().lock());
    for line in stdin.lock().lines() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("chio-receipt-verify: reading stdin: {e}");
                return ExitCode::FAILURE;
            }
        };
        let text = line.trim();
        let answer = if text.is_empty() { String::new() } else { verdict(mode, text) };
        if writeln!(out, "{answer}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    if out.flush().is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
