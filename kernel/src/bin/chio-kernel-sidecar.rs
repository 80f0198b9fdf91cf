//! The Chio kernel's sidecar: chio-api-protect 0.1.2's `ProtectProxy`, configured field by field
//! as chio-cli 0.1.2's `chio start` (`cmd_start`) configures it. chio-cli itself does not build
//! from crates.io, so this binary stands in for `chio start`.
//!
//! Usage: chio-kernel-sidecar [--state-dir DIR] [--listen ADDR] [--ephemeral-receipts]
//!
//! | flag                   | environment                       | default              |
//! |------------------------|-----------------------------------|----------------------|
//! | `--state-dir`          | `CHIO_STATE_DIR`                  | `./chio-state`       |
//! | `--listen`             | `CHIO_LISTEN`                     | `127.0.0.1:9090`     |
//! | `--ephemeral-receipts` | `CHIO_EPHEMERAL_RECEIPTS=1`       | off (durable)        |
//! | –                      | `CHIO_SIDECAR_CONTROL_TOKEN` (or `CHIO_API_PROTECT_CONTROL_TOKEN`) | none |
//! | –                      | `CHIO_TRUSTED_ISSUER_KEY(S)`      | none (the signer is always trusted) |
//!
//! State dir layout: `authority.seed` (64 hex chars + newline, mode 0600, as chio-control-plane
//! writes it), `budget.db`, `revocations.db` and, in durable mode, `receipts.db` (the kernel adds
//! `receipts.db.revocations` and `receipts.db.authority-locks/` beside it).
//!
//! Receipt modes. Durable (the default, as `chio start`): with a durable receipt store the
//! proxy installs durable admission on its mediation kernel, and 0.1.2 then denies every
//! side-effecting `/v1/evaluate` ("durable execution nonces require an atomic admission
//! participant"). Ephemeral (`--ephemeral-receipts`): receipts and the revocation set live in
//! memory, the budget store stays durable, and in-scope calls are authorized. The conformance
//! tests use the ephemeral mode because they need the allow path.
//!
//! Once the listener is bound it prints `chio sidecar listening on http://ADDR` on stdout, so
//! `--listen 127.0.0.1:0` can be used and the port read back.
use std::{
    env, fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::ExitCode,
};

use chio_api_protect::{ProtectConfig, ProtectProxy, DEFAULT_UPSTREAM_REQUEST_TIMEOUT};
use chio_core_types::crypto::{Keypair, PublicKey};

/// The empty OpenAPI document `chio start` uses (chio-cli `CHIO_START_SIDECAR_OPENAPI_SPEC`).
const SIDECAR_OPENAPI_SPEC: &str =
    "openapi: 3.1.0\ninfo:\n  title: chio-start-sidecar\n  version: 0.0.0\npaths: {}\n";
/// `chio start` never proxies upstream; port 1 makes the catch-all route fail loudly.
const NO_UPSTREAM_URL: &str = "http://127.0.0.1:1";

type BoxError = Box<dyn std::error::Error>;

struct Options {
    state_dir: PathBuf,
    listen: String,
    ephemeral: bool,
}

fn env_flag(name: &str) -> bool {
    env::var(name)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

fn non_empty_env(name: &str) -> Option<String> {
    env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        state_dir: PathBuf::from(non_empty_env("CHIO_STATE_DIR").unwrap_or_else(|| "./chio-state".into())),
        listen: non_empty_env("CHIO_LISTEN").unwrap_or_else(|| "127.0.0.1:9090".into()),
        ephemeral: env_flag("CHIO_EPHEMERAL_RECEIPTS"),
    };
    let mut args = env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--state-dir" => {
                options.state_dir = PathBuf::from(args.next().ok_or("--state-dir needs a value")?)
            }
            "--listen" => options.listen = args.next().ok_or("--listen needs a value")?,
            "--ephemeral-receipts" => options.ephemeral = true,
            "--durable-receipts" => options.ephemeral = false,
            "-h" | "--help" => {
                return Err("usage: chio-kernel-sidecar [--state-dir DIR] [--listen ADDR] \
                            [--ephemeral-receipts | --durable-receipts]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(options)
}

/// chio-control-plane `load_or_create_authority_keypair`: 64 hex chars + "\n", mode 0600.
fn load_or_create_seed(path: &Path) -> Result<String, BoxError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let seed = text.trim().to_string();
            Keypair::from_seed_hex(&seed)
                .map_err(|e| format!("{}: not a 32-byte hex seed: {e}", path.display()))?;
            Ok(seed)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate();
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            writeln!(file, "{}", keypair.seed_hex())?;
            file.sync_all()?;
            Ok(keypair.seed_hex())
        }
        Err(e) => Err(format!("{}: {e}", path.display()).into()),
    }
}

/// chio-cli `parse_trusted_capability_issuers_from_env`.
fn trusted_issuers() -> Result<Vec<PublicKey>, BoxError> {
    let mut keys = Vec::new();
    let single = non_empty_env("CHIO_TRUSTED_ISSUER_KEY");
    let many = non_empty_env("CHIO_TRUSTED_ISSUER_KEYS").unwrap_or_default();
    for text in single.iter().map(String::as_str).chain(many.split(',')) {
        let text = text.trim();
        if !text.is_empty() {
            keys.push(PublicKey::from_hex(text).map_err(|e| format!("trusted issuer key {text:?}: {e}"))?);
        }
    }
    Ok(keys)
}

fn path_string(path: PathBuf) -> String {
    path.display().to_string()
}

async fn run(options: Options) -> Result<(), BoxError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&options.state_dir)?;
    let dir = &options.state_dir;
    let seed_hex = load_or_create_seed(&dir.join("authority.seed"))?;
    let control_token = non_empty_env("CHIO_SIDECAR_CONTROL_TOKEN")
        .or_else(|| non_empty_env("CHIO_API_PROTECT_CONTROL_TOKEN"));
    if control_token.is_none() {
        eprintln!(
            "warning: no CHIO_SIDECAR_CONTROL_TOKEN; /v1/evaluate will answer 500 \
             chio_mediation_requires_reconcile_token"
        );
    }
    let config = ProtectConfig {
        upstream: NO_UPSTREAM_URL.to_string(),
        spec_content: Some(SIDECAR_OPENAPI_SPEC.to_string()),
        spec_path: None,
        listen_addr: options.listen.clone(),
        receipt_db: (!options.ephemeral).then(|| path_string(dir.join("receipts.db"))),
        allow_ephemeral_receipts: options.ephemeral,
        sidecar_control_token: control_token,
        signer_seed_hex: Some(seed_hex),
        trusted_capability_issuers: trusted_issuers()?,
        control_url: None,
        control_token: None,
        // A local SQLite budget store is hold-capable; without one /v1/evaluate has no kernel.
        budget_db: Some(path_string(dir.join("budget.db"))),
        revocation_db: Some(path_string(dir.join("revocations.db"))),
        require_nonce: false,
        allow_advisory: env_flag("CHIO_ALLOW_ADVISORY"),
        upstream_request_timeout: DEFAULT_UPSTREAM_REQUEST_TIMEOUT,
    };
    let mode = if options.ephemeral { "ephemeral" } else { "durable" };
    ProtectProxy::new(config)
        .run_with_observer(move |addr| {
            println!("chio sidecar listening on http://{addr}");
            println!("  receipts: {mode}");
            let _ = std::io::stdout().flush();
        })
        .await?;
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chio-kernel-sidecar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chio-kernel-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}
