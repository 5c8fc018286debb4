//! The record of a result cache hit, signed by the server (`construir-server`'s
//! result cache): an in-toto statement whose
//! subject is the result served (by its name for the new job, and its
//! sha256), and whose predicate says which entry served it: the key, the
//! job whose run made it, that job's time and host. It stands beside the
//! original provenance, which the server cannot and does not change.

use crate::{Envelope, HostKey, PublicKey, ResourceDescriptor};
use serde::{Deserialize, Serialize};

/// The record's predicate type (a URN: it names, it is not fetched).
pub const PREDICATE_TYPE: &str = "urn:construir:predicate:result-cache-hit:v1";

/// Where the record lands beside a hit's result: `done/<name>_d<N>.cache-hit.intoto.jsonl`.
pub const EXTENSION: &str = "cache-hit.intoto.jsonl";

/// What the record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HitPredicate {
    /// The entry's key and the lookup digest the submission gave.
    pub key: String,
    pub lookup: String,
    /// The job served, and the job file it received (sha256).
    pub job: String,
    pub job_file: String,
    /// The job whose run made the result, when it was submitted, and the host that signed it.
    pub original_job: String,
    pub original_submitted: String,
    pub original_host: String,
    /// A shared entry: the two hosts its verified rebuild found it reproducible on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reproduced_on: Vec<String>,
    /// When it was served (RFC 3339, UTC).
    pub served: String,
}

/// A whole record: the in-toto statement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HitStatement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<ResourceDescriptor>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: HitPredicate,
}

/// The record of serving `result_sha256` as `result_name`, signed with `key`: one line of JSON.
pub fn sign(key: &HostKey, result_name: &str, result_sha256: &str, predicate: HitPredicate) -> Vec<u8> {
    let statement = HitStatement {
        type_: crate::statement::STATEMENT_TYPE.to_owned(),
        subject: vec![ResourceDescriptor::file(result_name, result_sha256)],
        predicate_type: PREDICATE_TYPE.to_owned(),
        predicate,
    };
    let payload = serde_json::to_vec(&statement).expect("a record serializes");
    let envelope = crate::dsse::sign(&payload, key);
    let mut line = serde_json::to_vec(&envelope).expect("an envelope serializes");
    line.push(b'\n');
    line
}

/// The statement in a record, once its signature by `key` checks.
pub fn open(line: &[u8], key: &PublicKey) -> Result<HitStatement, String> {
    let envelope: Envelope = serde_json::from_slice(line).map_err(|e| format!("not an envelope: {e}"))?;
    let (payload, _) = crate::dsse::open(&envelope, std::slice::from_ref(key))
        .map_err(|e| format!("its signature does not check: {e}"))?;
    let statement: HitStatement =
        serde_json::from_slice(&payload).map_err(|e| format!("not a cache hit's record: {e}"))?;
    if statement.predicate_type != PREDICATE_TYPE {
        return Err(format!("its predicate type is {:?}", jobfile::sanitize(statement.predicate_type.as_bytes())));
    }
    Ok(statement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_opens_with_the_server_s_key_and_no_other() {
        let key = HostKey::from_seed([7; 32]);
        let predicate = HitPredicate {
            key: "k".into(),
            lookup: "l".into(),
            job: "j2".into(),
            job_file: "f".into(),
            original_job: "j1".into(),
            original_submitted: "2026-12-06T10:00:00Z".into(),
            original_host: "h1".into(),
            reproduced_on: Vec::new(),
            served: "2026-12-06T11:00:00Z".into(),
        };
        let line = sign(&key, "hello_d0.tar.xz", "abc", predicate.clone());
        let statement = open(&line, &key.public()).expect("opens");
        assert_eq!(statement.predicate, predicate);
        assert_eq!(statement.subject[0].sha256(), Some("abc"));
        assert!(open(&line, &HostKey::from_seed([8; 32]).public()).is_err(), "another key");
        let forged = String::from_utf8(line).expect("utf8").replace("\"sig\":\"", "\"sig\":\"A");
        assert!(open(forged.as_bytes(), &key.public()).is_err(), "a changed signature");
    }
}
