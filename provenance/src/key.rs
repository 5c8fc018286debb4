//! A build host's ed25519 key: made at first start, kept 0600 by the host
//! (never inside a VM's reach), its public half written `ed25519:<base64>`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

/// The first line of a key file; the seed follows in base64.
const HEADER: &str = "construir-ed25519-secret-key";
/// How a public key is written.
pub const PUBLIC_PREFIX: &str = "ed25519:";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} is not a regular file with one name owned by this user")]
    NotOwnFile { path: PathBuf },
    #[error("{path} can be read by others (mode {mode:o}): a host key must be 0600 (chmod 600 {path})")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path} is not a construir host key")]
    Malformed { path: PathBuf },
    #[error("cannot make a key: no randomness ({0})")]
    Random(String),
    #[error("{0:?} is not a public key: write ed25519:<base64 of 32 bytes>")]
    Public(String),
}

/// A host's signing key.
pub struct HostKey {
    signing: SigningKey,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostKey({})", self.public())
    }
}

impl HostKey {
    /// Reads the key at `path`, or makes one there when there is none
    /// (its directory 0700, the file 0600). Returns whether it was made.
    pub fn load_or_create(path: &Path) -> Result<(HostKey, bool), KeyError> {
        match HostKey::load(path) {
            Ok(key) => Ok((key, false)),
            Err(KeyError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                HostKey::create(path).map(|k| (k, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the key at `path`: a regular file with one name, owned by this
    /// user, readable by no one else.
    pub fn load(path: &Path) -> Result<HostKey, KeyError> {
        let read = |source| KeyError::Read { path: path.to_owned(), source };
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.nlink() != 1 || meta.uid() != me {
            return Err(KeyError::NotOwnFile { path: path.to_owned() });
        }
        if meta.mode() & 0o077 != 0 {
            return Err(KeyError::Exposed { path: path.to_owned(), mode: meta.mode() & 0o777 });
        }
        let mut text = String::new();
        io::Read::read_to_string(&mut io::Read::take(file, 4096), &mut text).map_err(read)?;
        let mut lines = text.lines();
        let seed = match (lines.next(), lines.next()) {
            (Some(HEADER), Some(b64)) => B64.decode(b64.trim()).ok(),
            _ => None,
        };
        let seed: [u8; 32] =
            seed.and_then(|s| s.try_into().ok()).ok_or_else(|| KeyError::Malformed { path: path.to_owned() })?;
        Ok(HostKey { signing: SigningKey::from_bytes(&seed) })
    }

    fn create(path: &Path) -> Result<HostKey, KeyError> {
        let write = |source| KeyError::Write { path: path.to_owned(), source };
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(write)?;
        }
        let tmp = path.with_extension("new");
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(write)?;
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(write)?;
        writeln!(file, "{HEADER}\n{}", B64.encode(seed)).map_err(write)?;
        file.sync_all().map_err(write)?;
        // Never over a key another start made meanwhile: that one wins.
        fs::hard_link(&tmp, path)
            .or_else(|e| if e.kind() == io::ErrorKind::AlreadyExists { Ok(()) } else { Err(e) })
            .map_err(write)?;
        let _ = fs::remove_file(&tmp);
        HostKey::load(path)
    }

    /// A key from a seed (tests, and the bench).
    pub fn from_seed(seed: [u8; 32]) -> HostKey {
        HostKey { signing: SigningKey::from_bytes(&seed) }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

/// A host's public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// `ed25519:<base64>`, or a file holding that (the first word of its first line).
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let word = text.split_whitespace().next().unwrap_or_default();
        let bytes = word.strip_prefix(PUBLIC_PREFIX).and_then(|b| B64.decode(b).ok());
        let raw: [u8; 32] = bytes
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| KeyError::Public(jobfile::sanitize(word.as_bytes())))?;
        VerifyingKey::from_bytes(&raw).map(PublicKey).map_err(|_| KeyError::Public(jobfile::sanitize(word.as_bytes())))
    }

    /// The key's id in an envelope: the sha256 of its 32 bytes, in hex.
    pub fn keyid(&self) -> String {
        use sha2::Digest;
        jobfile::hex(&sha2::Sha256::digest(self.0.as_bytes()))
    }

    /// Whether `signature` is this key's signature of `message` (strict: no malleable signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = <[u8; 64]>::try_from(signature) else { return false };
        self.0.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig)).is_ok()
    }
}

/// Keys as a command line gives them: each `ed25519:<base64>`, or a file
/// holding one per line (`construir-host key`'s output, `GET /v1/hosts/keys`
/// as text).
pub fn keys_from_args(args: &[String]) -> Result<Vec<PublicKey>, KeyError> {
    let mut out = Vec::new();
    for arg in args {
        if arg.starts_with(PUBLIC_PREFIX) {
            out.push(PublicKey::parse(arg)?);
            continue;
        }
        let path = PathBuf::from(arg);
        let text = fs::read_to_string(&path).map_err(|source| KeyError::Read { path: path.clone(), source })?;
        let before = out.len();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            out.push(PublicKey::parse(line)?);
        }
        if out.len() == before {
            return Err(KeyError::Public(format!("{} holds no key", path.display())));
        }
    }
    Ok(out)
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", B64.encode(self.0.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_kept_private_and_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("keys/h1.key");
        let (made, created) = HostKey::load_or_create(&path).expect("make");
        assert!(created);
        let meta = fs::metadata(&path).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(path.parent().expect("dir")).expect("meta").mode() & 0o777, 0o700);
        let (again, created) = HostKey::load_or_create(&path).expect("load");
        assert!(!created);
        assert_eq!(made.public(), again.public());
        let text = made.public().to_string();
        assert!(text.starts_with("ed25519:") && text.len() == 8 + 44, "{text}");
        assert_eq!(PublicKey::parse(&format!("{text} h1\n")).expect("parse"), made.public());
        let sig = made.sign(b"result");
        assert!(made.public().verify(b"result", &sig));
        assert!(!made.public().verify(b"resulT", &sig));
        assert!(!HostKey::from_seed([7; 32]).public().verify(b"result", &sig));
        // Readable by others: refused, saying how to fix it.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = HostKey::load(&path).expect_err("exposed");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        for bad in ["", "ed25519:", "ed25519:AAAA", "rsa:abc", "ed25519:!!!"] {
            assert!(PublicKey::parse(bad).is_err(), "{bad}");
        }
    }
}
