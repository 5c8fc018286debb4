//! `construir verify`: check a result against its signed provenance,
//! offline, with keys given by hand or the ones the server publishes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use construir_client::results::server_signers;
use wire::client::Api;

/// Checks `file` against `provenance` (beside it by default) with `keys`,
/// or, with none, each key the server publishes bound to its own host
/// (`api` makes the call only then). Exits 1 saying which check failed.
pub fn run(
    api: impl FnOnce() -> Result<Api>,
    file: &Path,
    provenance: Option<PathBuf>,
    keys: &[String],
) -> Result<ExitCode> {
    let provenance = provenance.unwrap_or_else(|| jobfile::layout::provenance_beside(file));
    let log = jobfile::layout::log_beside(file);
    // Keys given by hand are the reader's own choice; the server's are each bound to their host.
    let checked = if keys.is_empty() {
        let signers = server_signers(&api()?, None)?;
        construir_provenance::verify_signed_as(file, &provenance, &signers, log.as_deref()).map(|(_, v)| v)
    } else {
        construir_provenance::verify(file, &provenance, &construir_provenance::keys_from_args(keys)?, log.as_deref())
    };
    match checked {
        Ok(v) => {
            println!("{}: verified: {}", file.display(), v.summary());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // Checked, and it failed: 1, as `wait` says a job was not ok (2 is for what could not be checked).
            eprintln!("construir: {}: not verified: {}", file.display(), jobfile::error_chain(&e));
            Ok(ExitCode::from(1))
        }
    }
}
