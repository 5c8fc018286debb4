//! What made a construir result, signed, and the checks of a result
//! against it. For every job the build host (never the guest) writes an
//! in-toto Statement v1 with the SLSA provenance v1 predicate, in a DSSE
//! envelope signed with its ed25519 key, beside the result:
//! `done/<name>_d<N>.intoto.jsonl`, one envelope per line.
//!
//! The subjects are the result file (as delivered, without padding;
//! annotated `construir.kind: result`) and each regular file in it, by
//! sha256, under its path in the archive. A verifier needs only the result,
//! the statement and the host's public key.

pub mod cache_hit;
pub mod dsse;
pub mod key;
pub mod statement;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use dsse::Envelope;
pub use key::{keys_from_args, HostKey, KeyError, PublicKey};
pub use statement::{
    External, ImageParameter, JobParameter, Machine, RebuildParameter, ResourceDescriptor, Sha256, Statement,
};

use jobfile::tools::EntryDigest;

/// Most bytes of a provenance file that are read.
pub const MAX_PROVENANCE: u64 = 16 << 20;
/// The annotation that marks a subject as the result file itself.
pub const KIND: &str = "construir.kind";
/// On the result's subject: why its files are not listed one by one (its
/// archive cannot be read within [`member_limits`]); the result's own digest still binds it.
pub const UNLISTED: &str = "construir.files-unlisted";

/// What listing a result's files may cost: bytes the archive produces, and
/// time. A guest can make a small result expand hugely; past this only the
/// whole file's digest is signed.
pub fn member_limits() -> jobfile::ReadLimits {
    jobfile::ReadLimits::new(4 << 30, std::time::Duration::from_secs(120))
}

#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error("cannot hash {path}")]
    Hash { path: PathBuf, source: io::Error },
    #[error("cannot list the files in {path}")]
    List { path: PathBuf, source: jobfile::tools::JobToolError },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
}

/// What a host knows of a job it ran, for its statement.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    /// The result file, as it will be delivered (without padding).
    pub result: &'a Path,
    /// Its name in `done/`.
    pub result_name: String,
    /// The console log, as delivered beside it, and its name.
    pub log: &'a [u8],
    pub log_name: String,
    /// The job's id (the server's) or file name.
    pub invocation: String,
    /// What the submitter chose: the job file's digest, the image, the declared packages and caches.
    pub external: statement::External,
    /// What the host chose: QEMU, the accelerator, CPUs, memory, the jail.
    pub internal: statement::Machine,
    /// Every file that went into the VM, by digest.
    pub dependencies: Vec<ResourceDescriptor>,
    /// The host's id, and construir's version.
    pub builder_id: String,
    pub version: String,
    /// RFC 3339, UTC.
    pub started: String,
    pub finished: String,
}

/// A file's sha256 in lowercase hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    use sha2::Digest;
    jobfile::hex(&sha2::Sha256::digest(data))
}

/// The statement for `job`: hashes the result and each file in it.
pub fn statement(job: &Job<'_>) -> Result<Statement, ProvenanceError> {
    let whole = jobfile::image::sha256_file(job.result)
        .map_err(|source| ProvenanceError::Hash { path: job.result.to_owned(), source })?;
    let mut result = ResourceDescriptor::file(job.result_name.clone(), whole);
    result.annotations.insert(KIND.into(), "result".into());
    let listed = members(job.result);
    if let Err(why) = &listed {
        result.annotations.insert(UNLISTED.into(), jobfile::error_chain(why).into());
    }
    let mut subject = vec![result];
    subject.extend(listed.unwrap_or_default().into_iter().filter_map(|e| {
        let mut d = ResourceDescriptor::file(e.path, e.sha256?);
        d.annotations.insert("mode".into(), format!("{:04o}", e.mode).into());
        Some(d)
    }));
    let log = ResourceDescriptor::file(job.log_name.clone(), sha256_bytes(job.log));
    Ok(Statement {
        type_: statement::STATEMENT_TYPE.into(),
        subject,
        predicate_type: statement::PREDICATE_TYPE.into(),
        predicate: statement::Provenance {
            build_definition: statement::BuildDefinition {
                build_type: statement::BUILD_TYPE.into(),
                external_parameters: job.external.clone(),
                internal_parameters: job.internal.clone(),
                resolved_dependencies: job.dependencies.clone(),
            },
            run_details: statement::RunDetails {
                builder: statement::Builder {
                    id: job.builder_id.clone(),
                    version: [("construir".to_owned(), job.version.clone())].into_iter().collect(),
                },
                metadata: statement::Metadata {
                    invocation_id: job.invocation.clone(),
                    started_on: job.started.clone(),
                    finished_on: job.finished.clone(),
                },
                byproducts: vec![log],
            },
        },
    })
}

/// The entries of the result at `path`, each regular file hashed.
fn members(path: &Path) -> Result<Vec<EntryDigest>, ProvenanceError> {
    jobfile::tools::digests(path, member_limits())
        .map_err(|source| ProvenanceError::List { path: path.to_owned(), source })
}

/// Signs `statement` with `key`.
pub fn sign(statement: &Statement, key: &HostKey) -> Envelope {
    dsse::sign(&serde_json::to_vec(statement).expect("a statement always serializes"), key)
}

/// Writes `envelope` as `path` (one JSON line), whole: a temporary name, synced, renamed.
pub fn write(path: &Path, envelope: &Envelope) -> Result<(), ProvenanceError> {
    let mut line = serde_json::to_vec(envelope).expect("an envelope always serializes");
    line.push(b'\n');
    jobfile::layout::write_whole(path, &line).map_err(|source| ProvenanceError::Write { path: path.to_owned(), source })
}

/// Why a result does not check out against its provenance; each says which check failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no provenance: cannot read {path}")]
    NoProvenance { path: PathBuf, source: io::Error },
    #[error("{path} is not a provenance file (one DSSE envelope per line, at most 16 MiB): {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("signature: {0}")]
    Signature(#[from] dsse::DsseError),
    #[error("the signed payload is not an in-toto statement: {0}")]
    Statement(String),
    #[error("cannot read the result {path}")]
    Result { path: PathBuf, source: io::Error },
    #[error(
        "the result's sha256 is {actual}, the statement says {expected}: the result is not the one the host signed"
    )]
    ResultChanged { expected: String, actual: String },
    #[error("cannot list the files in the result")]
    List(#[source] jobfile::tools::JobToolError),
    #[error("{path} in the result does not match the statement (sha256 {actual}, signed {expected})")]
    FileChanged { path: String, expected: String, actual: String },
    #[error("{path} is in the statement but not in the result")]
    FileMissing { path: String },
    #[error("{path} is in the result but not in the statement")]
    FileExtra { path: String },
    #[error("the log {path} does not match the statement (sha256 {actual}, signed {expected})")]
    LogChanged { path: PathBuf, expected: String, actual: String },
    #[error("cannot read the log {path}")]
    Log { path: PathBuf, source: io::Error },
    #[error("it is signed as {builder}, not as {signer}, whose key signed it")]
    WrongBuilder { builder: String, signer: String },
}

/// What a check found: the statement and the key that signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    pub statement: Statement,
    pub key: PublicKey,
    /// Files in the result checked against the statement.
    pub files: usize,
}

impl Verified {
    /// One line for a person: who signed, what it covers, what ran it.
    pub fn summary(&self) -> String {
        let p = &self.statement.predicate;
        let ext = &p.build_definition.external_parameters;
        format!(
            "signed by {} ({}); the result and its {} file(s) match; image {}, job file sha256 {}",
            self.key,
            jobfile::sanitize(p.run_details.builder.id.as_bytes()),
            self.files,
            jobfile::sanitize(ext.image.name.as_bytes()),
            jobfile::sanitize(ext.job.digest.sha256.as_bytes()),
        )
    }
}

/// Reads the envelopes in the provenance file at `path`.
pub fn read(path: &Path) -> Result<Vec<Envelope>, VerifyError> {
    let raw = jobfile::layout::read_small(path, MAX_PROVENANCE)
        .map_err(|why| VerifyError::Malformed { path: path.to_owned(), why })?;
    let Some(raw) = raw else {
        return Err(VerifyError::NoProvenance { path: path.to_owned(), source: io::ErrorKind::NotFound.into() });
    };
    let text = String::from_utf8(raw)
        .map_err(|_| VerifyError::Malformed { path: path.to_owned(), why: "not UTF-8".into() })?;
    let envelopes: Vec<Envelope> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| VerifyError::Malformed { path: path.to_owned(), why: e.to_string() })?;
    if envelopes.is_empty() {
        return Err(VerifyError::Malformed { path: path.to_owned(), why: "it holds no envelope".into() });
    }
    Ok(envelopes)
}

/// Checks `result` against the provenance at `provenance`: a signature by
/// one of `keys`, the statement's types, the result's digest, every file
/// in it, and the log's digest when `log` is given.
pub fn verify(
    result: &Path,
    provenance: &Path,
    keys: &[PublicKey],
    log: Option<&Path>,
) -> Result<Verified, VerifyError> {
    let envelopes = read(provenance)?;
    let (payload, key) = dsse::open(&envelopes[0], keys)?;
    let statement: Statement = serde_json::from_slice(&payload).map_err(|e| VerifyError::Statement(e.to_string()))?;
    if statement.type_ != statement::STATEMENT_TYPE || statement.predicate_type != statement::PREDICATE_TYPE {
        return Err(VerifyError::Statement(format!(
            "its types are {:?} and {:?}",
            jobfile::sanitize(statement.type_.as_bytes()),
            jobfile::sanitize(statement.predicate_type.as_bytes())
        )));
    }
    let whole = statement
        .subject
        .iter()
        .find(|s| s.annotations.get(KIND).and_then(|v| v.as_str()) == Some("result"))
        .ok_or_else(|| VerifyError::Statement("it names no result".into()))?;
    let actual = jobfile::image::sha256_file(result)
        .map_err(|source| VerifyError::Result { path: result.to_owned(), source })?;
    let expected = whole.sha256().unwrap_or_default().to_owned();
    if actual != expected {
        return Err(VerifyError::ResultChanged { expected, actual });
    }
    // Its digest matched: the files in it are the signed ones unless the host signed others.
    if whole.annotations.contains_key(UNLISTED) {
        return Ok(Verified { statement, key, files: 0 });
    }
    let in_result = jobfile::tools::digests(result, member_limits()).map_err(VerifyError::List)?;
    let files = check_files(&statement, &in_result)?;
    if let Some(log) = log {
        let data = fs::read(log).map_err(|source| VerifyError::Log { path: log.to_owned(), source })?;
        let actual = sha256_bytes(&data);
        let expected =
            statement.predicate.run_details.byproducts.first().and_then(|b| b.sha256()).unwrap_or_default().to_owned();
        if actual != expected {
            return Err(VerifyError::LogChanged { path: log.to_owned(), expected, actual });
        }
    }
    Ok(Verified { statement, key, files })
}

/// The builder id a host signs its results as.
pub fn builder_id(host: &str) -> String {
    format!("construir-host:{host}")
}

/// [`verify`], with each key tied to the host it belongs to: the
/// statement must name as its builder the host whose key signed it. The
/// caller chooses the signers (the one host that ran a job, never every
/// key it knows); returns which of them signed.
pub fn verify_signed_as(
    result: &Path,
    provenance: &Path,
    signers: &[(String, PublicKey)],
    log: Option<&Path>,
) -> Result<(String, Verified), VerifyError> {
    let keys: Vec<PublicKey> = signers.iter().map(|(_, k)| *k).collect();
    let verified = verify(result, provenance, &keys, log)?;
    let builder = &verified.statement.predicate.run_details.builder.id;
    let mut owners = signers.iter().filter(|(_, k)| *k == verified.key).map(|(name, _)| name);
    let first = owners.clone().next().cloned().unwrap_or_default();
    match owners.find(|name| builder_id(name) == *builder) {
        Some(name) => Ok((name.clone(), verified)),
        None => Err(VerifyError::WrongBuilder {
            builder: jobfile::sanitize(builder.as_bytes()),
            signer: jobfile::sanitize(first.as_bytes()),
        }),
    }
}

/// Most files a statement may name: far more than a result holds, few
/// enough that checking them stays well under a second.
pub const MAX_SUBJECTS: usize = 1 << 20;

/// Checks the regular files in the result against the statement's
/// subjects, by name through an index (each subject named once): every
/// file signed with its digest, every signed file there. Returns how many.
fn check_files(statement: &Statement, in_result: &[EntryDigest]) -> Result<usize, VerifyError> {
    use std::collections::HashMap;
    let signed: Vec<&ResourceDescriptor> =
        statement.subject.iter().filter(|s| s.annotations.get(KIND).is_none()).collect();
    if signed.len() > MAX_SUBJECTS {
        return Err(VerifyError::Statement(format!(
            "it names {} files; at most {MAX_SUBJECTS} are read",
            signed.len()
        )));
    }
    let mut by_name: HashMap<&str, (&ResourceDescriptor, bool)> = HashMap::with_capacity(signed.len());
    for s in &signed {
        if by_name.insert(s.name.as_str(), (s, false)).is_some() {
            return Err(VerifyError::Statement(format!("it names {} twice", jobfile::sanitize(s.name.as_bytes()))));
        }
    }
    let mut files = 0;
    for e in in_result.iter().filter(|e| e.sha256.is_some()) {
        let actual = e.sha256.clone().unwrap_or_default();
        match by_name.get_mut(e.path.as_str()) {
            None => return Err(VerifyError::FileExtra { path: e.path.clone() }),
            Some((_, true)) => return Err(VerifyError::FileExtra { path: e.path.clone() }),
            Some((s, _)) if s.sha256() != Some(actual.as_str()) => {
                return Err(VerifyError::FileChanged {
                    path: e.path.clone(),
                    expected: s.sha256().unwrap_or_default().to_owned(),
                    actual,
                })
            }
            Some((_, seen)) => {
                *seen = true;
                files += 1;
            }
        }
    }
    if let Some(missing) = signed.iter().find(|s| by_name.get(s.name.as_str()).is_some_and(|(_, seen)| !seen)) {
        return Err(VerifyError::FileMissing { path: missing.name.clone() });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    /// A result holding `files` (path, contents), packed as a host packs one.
    fn result(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
        let tree = dir.join("tree");
        for (path, data) in files {
            let p = tree.join(path);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(p, data).expect("write");
        }
        let out = dir.join("r_d0.tar.xz");
        let file = fs::File::create(&out).expect("create");
        jobfile::pack_dir(&tree, file, 1 << 20, &jobfile::PackOptions::default()).expect("pack");
        out
    }

    fn job<'a>(result: &'a Path, log: &'a [u8]) -> Job<'a> {
        Job {
            result,
            result_name: "r_d0.tar.xz".into(),
            log,
            log_name: "r_d0.log".into(),
            invocation: "r_i0.tar.xz".into(),
            external: External {
                job: JobParameter { name: "r_i0.tar.xz".into(), digest: Sha256 { sha256: "ab".into() } },
                ..Default::default()
            },
            internal: Machine { accelerator: "tcg".into(), ..Default::default() },
            dependencies: vec![ResourceDescriptor::file("vmlinux", "cd")],
            builder_id: "construir-host:h1".into(),
            version: "0.1.0".into(),
            started: "2026-12-03T10:00:00Z".into(),
            finished: "2026-12-03T10:00:05Z".into(),
        }
    }

    #[test]
    fn a_signed_result_verifies_and_every_tampering_is_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let r = result(tmp.path(), &[("out/a.txt", b"alpha"), ("job_status.json", b"{}")]);
        let log = tmp.path().join("r_d0.log");
        fs::write(&log, b"console\n").expect("log");
        let key = HostKey::from_seed([3; 32]);
        let st = statement(&job(&r, b"console\n")).expect("statement");
        // The published field names, as in-toto and SLSA spell them.
        let json = serde_json::to_value(&st).expect("json");
        assert_eq!(json["_type"], statement::STATEMENT_TYPE);
        assert_eq!(json["predicateType"], statement::PREDICATE_TYPE);
        assert_eq!(json["predicate"]["buildDefinition"]["buildType"], statement::BUILD_TYPE);
        assert_eq!(json["predicate"]["runDetails"]["metadata"]["invocationId"], "r_i0.tar.xz");
        assert_eq!(json["predicate"]["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"], "cd");
        assert_eq!(json["subject"][0]["annotations"][KIND], "result");
        let names: Vec<&str> = st.subject.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"out/a.txt") && names.contains(&"job_status.json"), "{names:?}");
        assert_eq!(
            st.subject.iter().find(|s| s.name == "out/a.txt").and_then(|s| s.sha256()),
            Some(sha256_bytes(b"alpha").as_str())
        );
        let prov = tmp.path().join("r_d0.intoto.jsonl");
        write(&prov, &sign(&st, &key)).expect("write");
        let ok = verify(&r, &prov, &[key.public()], Some(&log)).expect("verifies");
        assert_eq!((ok.files, ok.key), (2, key.public()));

        // A wrong key, a missing signature, a changed statement: each named.
        let other = HostKey::from_seed([4; 32]);
        let err = verify(&r, &prov, &[other.public()], None).expect_err("wrong key");
        assert!(err.to_string().contains("no signature is by a key given"), "{err}");
        let env = read(&prov).expect("read").remove(0);
        let mut unsigned = env.clone();
        unsigned.signatures.clear();
        let bad = tmp.path().join("unsigned.jsonl");
        write(&bad, &unsigned).expect("write");
        assert!(verify(&r, &bad, &[key.public()], None)
            .expect_err("unsigned")
            .to_string()
            .contains("has no signature"));
        let mut changed = env.clone();
        let mut forged = st.clone();
        forged.subject[0].digest.insert("sha256".into(), "00".repeat(32));
        changed.payload = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&forged).expect("json"));
        write(&bad, &changed).expect("write");
        let err = verify(&r, &bad, &[key.public()], None).expect_err("changed statement");
        assert!(err.to_string().contains("does not match: the statement or the signature was changed"), "{err}");
        fs::write(&bad, b"not json\n").expect("write");
        assert!(matches!(verify(&r, &bad, &[key.public()], None), Err(VerifyError::Malformed { .. })));
        assert!(matches!(
            verify(&r, &tmp.path().join("none.jsonl"), &[key.public()], None),
            Err(VerifyError::NoProvenance { .. })
        ));

        // A changed result (one byte) and a changed log.
        let mut data = fs::read(&r).expect("read");
        let last = data.len() - 1;
        data[last] ^= 1;
        let tampered = tmp.path().join("t_d0.tar.xz");
        fs::write(&tampered, &data).expect("write");
        let err = verify(&tampered, &prov, &[key.public()], None).expect_err("tampered result");
        assert!(matches!(err, VerifyError::ResultChanged { .. }), "{err}");
        fs::write(&log, b"console, edited\n").expect("log");
        assert!(matches!(verify(&r, &prov, &[key.public()], Some(&log)), Err(VerifyError::LogChanged { .. })));

        // A result that is no archive (a guest wrote garbage): its digest alone is signed, and checks.
        let garbage = tmp.path().join("g_d0.tar.xz");
        fs::write(&garbage, b"not an archive at all").expect("write");
        let gst = statement(&job(&garbage, b"")).expect("statement of garbage");
        assert_eq!(gst.subject.len(), 1);
        assert!(gst.subject[0].annotations.contains_key(UNLISTED), "{:?}", gst.subject[0]);
        let gp = tmp.path().join("g.jsonl");
        write(&gp, &sign(&gst, &key)).expect("write");
        assert_eq!(verify(&garbage, &gp, &[key.public()], None).expect("verifies").files, 0);

        // A host that signs a statement whose files do not match its result is caught too.
        let other_result = result(&tmp.path().join("o"), &[("out/a.txt", b"ALPHA"), ("job_status.json", b"{}")]);
        let mut lying = statement(&job(&other_result, b"")).expect("statement");
        lying.subject[0] = st.subject[0].clone();
        let lie = tmp.path().join("lie.jsonl");
        write(&lie, &sign(&lying, &key)).expect("write");
        let err = verify(&r, &lie, &[key.public()], None).expect_err("lying");
        assert!(err.to_string().starts_with("out/a.txt in the result does not match the statement"), "{err}");
    }

    #[test]
    fn a_statement_that_names_a_file_twice_is_refused_and_many_files_are_checked_by_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let names: Vec<String> = (0..5000).map(|i| format!("out/{}/f{i}", i % 50)).collect();
        let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), n.as_bytes())).collect();
        let r = result(tmp.path(), &files);
        let key = HostKey::from_seed([5; 32]);
        let st = statement(&job(&r, b"")).expect("statement");
        let prov = tmp.path().join("r_d0.intoto.jsonl");
        write(&prov, &sign(&st, &key)).expect("write");
        assert_eq!(verify(&r, &prov, &[key.public()], None).expect("verifies").files, 5000);
        let mut twice = st.clone();
        let dup = twice.subject[1].clone();
        twice.subject.push(dup);
        write(&prov, &sign(&twice, &key)).expect("write");
        let err = verify(&r, &prov, &[key.public()], None).expect_err("a name twice");
        assert!(err.to_string().contains("twice"), "{err}");
    }
}
