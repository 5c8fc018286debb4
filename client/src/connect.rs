//! Reaching the server as one account: the server, the token and the CA,
//! from the command line, the environment and `~/.config/construir/client.toml`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use wire::client::{Api, Settings};

use crate::cli::Cli;

/// `~/.config/construir/client.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    server: Option<String>,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
}

fn config_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("construir/client.toml"))
}

/// What `construir` says when a call needs a token and none was given.
const NO_TOKEN: &str = "no token: give --token-file FILE, set CONSTRUIR_TOKEN_FILE or CONSTRUIR_TOKEN, or put `token = \"...\"` in ~/.config/construir/client.toml";

/// The server's API as `cli` says to reach it: each of the server, the
/// token and the CA from the command line, else the environment, else the
/// config file.
pub fn connect(cli: &Cli) -> Result<Api> {
    let file: ClientConfig = match config_file() {
        Some(path) if path.exists() => {
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let config: ClientConfig =
                toml::from_str(&text).with_context(|| format!("{} is not a valid client config", path.display()))?;
            if config.token.is_some() {
                warn_if_readable(&path);
            }
            config
        }
        _ => ClientConfig::default(),
    };
    let server = cli
        .server
        .clone()
        .or_else(|| std::env::var("CONSTRUIR_SERVER").ok())
        .or(file.server)
        .unwrap_or_else(|| "http://127.0.0.1:8765".to_owned());
    let token = match cli.token.clone() {
        Some(t) => Some(t),
        None => read_token_file(
            cli.token_file.clone().or_else(|| std::env::var_os("CONSTRUIR_TOKEN_FILE").map(PathBuf::from)),
        )?
        .or_else(|| std::env::var("CONSTRUIR_TOKEN").ok())
        .or(file.token),
    };
    let ca_cert =
        cli.ca_cert.clone().or_else(|| std::env::var_os("CONSTRUIR_CA_CERT").map(PathBuf::from)).or(file.ca_cert);
    let token = token.ok_or_else(|| NO_TOKEN.to_owned());
    Ok(Api::new(&Settings { server, token, ca_cert, timeout: None })?)
}

/// Says so when a file holding a token can be read by others than its owner.
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "construir: warning: {} holds a token and is mode {mode:03o}: others on this machine can read it (chmod 600 {})",
                path.display(),
                path.display()
            );
        }
    }
}

/// The token in `path` (its first line, trimmed), when a path is given.
fn read_token_file(path: Option<PathBuf>) -> Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    warn_if_readable(&path);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(Some(token))
}
