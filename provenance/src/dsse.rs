//! DSSE (Dead Simple Signing Envelope) v1: the signature covers the
//! payload's type and bytes through the pre-authentication encoding, never
//! a re-serialization of JSON.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::key::{HostKey, PublicKey};

/// The payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The statement's bytes, in base64.
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    #[serde(default)]
    pub keyid: String,
    /// The ed25519 signature of the PAE, in base64.
    pub sig: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DsseError {
    #[error("the envelope's payload type is {0:?}, not an in-toto statement ({PAYLOAD_TYPE})")]
    PayloadType(String),
    #[error("the envelope has no signature")]
    Unsigned,
    #[error("the envelope's payload is not base64")]
    Payload,
    #[error("no signature is by a key given ({keyids}): signed by another host, or with no key to check it")]
    UnknownKey { keyids: String },
    #[error("the signature by key {keyid} does not match: the statement or the signature was changed")]
    BadSignature { keyid: String },
}

/// The pre-authentication encoding: `DSSEv1 <len> <type> <len> <body>`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Signs `payload` (an in-toto statement's bytes) with `key`.
pub fn sign(payload: &[u8], key: &HostKey) -> Envelope {
    let sig = key.sign(&pae(PAYLOAD_TYPE, payload));
    Envelope {
        payload: B64.encode(payload),
        payload_type: PAYLOAD_TYPE.to_owned(),
        signatures: vec![Signature { keyid: key.public().keyid(), sig: B64.encode(sig) }],
    }
}

/// The payload of `envelope` once a signature by one of `keys` checks;
/// with the key that made it.
pub fn open(envelope: &Envelope, keys: &[PublicKey]) -> Result<(Vec<u8>, PublicKey), DsseError> {
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(DsseError::PayloadType(jobfile::sanitize(envelope.payload_type.as_bytes())));
    }
    if envelope.signatures.is_empty() {
        return Err(DsseError::Unsigned);
    }
    let payload = B64.decode(&envelope.payload).map_err(|_| DsseError::Payload)?;
    let message = pae(&envelope.payload_type, &payload);
    let mut tried = Vec::new();
    for s in &envelope.signatures {
        // A signature names its key; one with no id is tried against every key.
        let candidates: Vec<&PublicKey> = keys.iter().filter(|k| s.keyid.is_empty() || k.keyid() == s.keyid).collect();
        if candidates.is_empty() {
            tried.push(jobfile::sanitize(s.keyid.as_bytes()));
            continue;
        }
        let sig = B64.decode(&s.sig).unwrap_or_default();
        if let Some(k) = candidates.into_iter().find(|k| k.verify(&message, &sig)) {
            return Ok((payload, *k));
        }
        return Err(DsseError::BadSignature { keyid: jobfile::sanitize(s.keyid.as_bytes()) });
    }
    Err(DsseError::UnknownKey { keyids: tried.join(", ") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_the_spec_s_encoding() {
        // The DSSE specification's own example.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn an_envelope_opens_only_with_its_key_and_unchanged() {
        let key = HostKey::from_seed([1; 32]);
        let other = HostKey::from_seed([2; 32]);
        let env = sign(br#"{"a":1}"#, &key);
        assert_eq!(open(&env, &[other.public(), key.public()]).expect("opens").0, br#"{"a":1}"#.to_vec());
        assert!(matches!(open(&env, &[other.public()]), Err(DsseError::UnknownKey { .. })));
        let mut changed = env.clone();
        changed.payload = B64.encode(br#"{"a":2}"#);
        assert!(matches!(open(&changed, &[key.public()]), Err(DsseError::BadSignature { .. })));
        let mut retyped = env.clone();
        retyped.payload_type = "text/plain".into();
        assert!(matches!(open(&retyped, &[key.public()]), Err(DsseError::PayloadType(_))));
        let mut unsigned = env.clone();
        unsigned.signatures.clear();
        assert_eq!(open(&unsigned, &[key.public()]), Err(DsseError::Unsigned));
        // A signature by another key under this key's id does not pass.
        let mut forged = env;
        forged.signatures[0].sig = B64.encode(other.sign(&pae(PAYLOAD_TYPE, br#"{"a":1}"#)));
        assert!(matches!(open(&forged, &[key.public()]), Err(DsseError::BadSignature { .. })));
    }
}
