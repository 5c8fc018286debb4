//! The host's side of provenance: its signing key, and the record of what
//! went into each job's VM, signed beside the result as
//! `done/<name>_d<N>.intoto.jsonl` (`construir_provenance` has the format).
//! The host writes it, never the guest: everything it names is what the
//! host itself handed to QEMU.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use construir_provenance::{
    External, HostKey, ImageParameter, JobParameter, Machine, RebuildParameter, ResourceDescriptor, Sha256,
};
use jobfile::JobName;

use crate::image::Image;

/// What signs this host's results, and the facts about it every statement carries.
#[derive(Debug)]
pub struct Signer {
    pub key: HostKey,
    /// The QEMU version, as `major.minor`.
    pub qemu: String,
    /// The confinement layers, as the host's start line names them.
    pub jail: String,
}

/// Where a host keeps its key by default: `keys/<host-id>.key` beside the queue.
pub fn default_key_path(queue: &Path, host_id: &str) -> PathBuf {
    jobfile::layout::sibling(queue, "keys").join(format!("{host_id}.key"))
}

/// Where a host on a queue publishes its public key for the server:
/// `running/.keys/<host-id>.pub`.
pub fn publish(running: &Path, host_id: &str, key: &HostKey) -> io::Result<()> {
    let path = jobfile::layout::host_key_file(running, host_id);
    jobfile::layout::write_whole(&path, format!("{} {host_id}\n", key.public()).as_bytes())
}

/// What the host records of one job, from its claim to its delivery.
#[derive(Debug, Clone)]
pub struct Record {
    pub started: String,
    pub external: External,
    pub internal: Machine,
    pub dependencies: Vec<ResourceDescriptor>,
    /// How long hashing the job file took (for the log and the bench).
    pub hashed: std::time::Duration,
}

/// What went into the VM, as the host chose it.
pub struct Inputs<'a> {
    pub file_name: &'a OsStr,
    /// The job file's sha256, taken before the VM got it.
    pub job_sha256: String,
    pub image: &'a Image,
    /// The declared packages (as written) and caches.
    pub packages: Vec<String>,
    pub caches: &'a [jobfile::caches::Given],
    pub layer: Option<&'a jobfile::deps::LayerRecord>,
    /// The owner of the caches lent.
    pub owner: Option<&'a str>,
    /// A verified rebuild's terms, when the job is one of its runs.
    pub rebuild: Option<&'a jobfile::rebuild::Terms>,
    /// Whether its VM holds a debug session open when it fails.
    pub debug: bool,
    /// The name and `SOURCE_DATE_EPOCH` the server fixed for it.
    pub env: Option<&'a jobfile::jobenv::JobEnv>,
}

impl Record {
    /// What a job's provenance says of it: `inputs` as the host chose
    /// them, on `machine`, claimed at `started`.
    pub fn new(inputs: Inputs<'_>, started: String, machine: Machine, hashed: std::time::Duration) -> Record {
        let image = inputs.image;
        let image_name = format!("i{}", image.number);
        let manifest_sha = jobfile::image::sha256_file(&image.dir.join(jobfile::image::MANIFEST)).unwrap_or_default();
        let external = External {
            job: JobParameter {
                name: jobfile::sanitize(inputs.file_name.as_encoded_bytes()),
                digest: Sha256 { sha256: inputs.job_sha256.clone() },
            },
            image: ImageParameter {
                name: image_name.clone(),
                manifest: Sha256 { sha256: manifest_sha.clone() },
                kind: image.manifest.kind.clone(),
                suite: image.manifest.suite.clone(),
            },
            packages: inputs.packages,
            caches: inputs.caches.iter().map(|c| c.name.clone()).collect(),
            rebuild: inputs.rebuild.map(|t| RebuildParameter {
                name: t.name.clone(),
                source_date_epoch: t.epoch,
                other_run: t.sibling.clone(),
            }),
            debug: inputs.debug,
            environment: inputs
                .env
                .map(|e| e.vars().into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                .unwrap_or_default(),
        };
        let mut dependencies =
            vec![ResourceDescriptor::file(format!("{image_name}/{}", jobfile::image::MANIFEST), manifest_sha)];
        for (file, sha) in &image.manifest.sha256 {
            dependencies.push(ResourceDescriptor::file(format!("{image_name}/{file}"), sha.clone()));
        }
        if let Some(layer) = inputs.layer {
            let mut d = ResourceDescriptor::file(format!("layer/{}", layer.key), layer.sha256.clone());
            d.annotations.insert("construir.kind".into(), "layer".into());
            dependencies.push(d);
            for p in &layer.install {
                let mut d = ResourceDescriptor::file(
                    format!("{}_{}_{}.deb", p.name, p.version, p.architecture),
                    p.sha256.clone(),
                );
                d.uri = p.filename.clone();
                dependencies.push(d);
            }
        }
        for c in inputs.caches {
            let Some(version) = c.version else { continue };
            dependencies.push(ResourceDescriptor {
                name: format!("cache/{}", c.name),
                uri: format!(
                    "construir-cache:{}/i{}/{}@{version}",
                    inputs.owner.unwrap_or_default(),
                    image.number,
                    c.name
                ),
                annotations: [("construir.kind".to_owned(), "cache".into()), ("version".to_owned(), version.into())]
                    .into_iter()
                    .collect(),
                ..Default::default()
            });
        }
        Record { started, external, internal: machine, dependencies, hashed }
    }
}

/// Signs a statement for the result staged at `result` (in `done/`, not
/// yet in place) and its `log`, and writes it staged beside them; returns
/// the staged name, which lands with the result (`jobfile::layout::land`).
#[allow(clippy::too_many_arguments)]
pub fn sign_staged(
    done: &Path,
    signer: &Signer,
    record: &Record,
    job: &JobName,
    result: &Path,
    log: &[u8],
    host_id: &str,
    tag: &str,
) -> Result<OsString, construir_provenance::ProvenanceError> {
    let statement = construir_provenance::statement(&construir_provenance::Job {
        result,
        result_name: job.done_file_name(),
        log,
        log_name: job.done_with_extension("log"),
        invocation: job.input_file_name(),
        external: record.external.clone(),
        internal: record.internal.clone(),
        dependencies: record.dependencies.clone(),
        builder_id: format!("construir-host:{host_id}"),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started: record.started.clone(),
        finished: jobfile::units::rfc3339(std::time::SystemTime::now()),
    })?;
    let envelope = construir_provenance::sign(&statement, &signer.key);
    let staged =
        OsString::from(format!(".{}.{tag}.tmp", job.done_with_extension(jobfile::layout::PROVENANCE_EXTENSION)));
    construir_provenance::write(&done.join(&staged), &envelope)?;
    Ok(staged)
}
