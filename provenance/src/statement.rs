//! The in-toto Statement v1 with the SLSA provenance v1 predicate, as plain
//! serde types under the published field names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// `predicateType` of SLSA provenance v1.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// What a construir job's build definition means (a URN: it names, it is not fetched).
pub const BUILD_TYPE: &str = "urn:construir:build-type:job:v1";

/// An in-toto Statement v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<ResourceDescriptor>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Provenance,
}

/// An in-toto ResourceDescriptor: what a subject, a dependency or a byproduct is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceDescriptor {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uri: String,
    /// Algorithm -> lowercase hex (`sha256` here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digest: BTreeMap<String, String>,
    #[serde(rename = "mediaType", default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub annotations: serde_json::Map<String, serde_json::Value>,
}

impl ResourceDescriptor {
    /// A file named `name` with its sha256.
    pub fn file(name: impl Into<String>, sha256: impl Into<String>) -> ResourceDescriptor {
        ResourceDescriptor {
            name: name.into(),
            digest: [("sha256".to_owned(), sha256.into())].into_iter().collect(),
            ..Default::default()
        }
    }

    pub fn sha256(&self) -> Option<&str> {
        self.digest.get("sha256").map(String::as_str)
    }
}

/// The SLSA provenance v1 predicate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    #[serde(rename = "buildDefinition")]
    pub build_definition: BuildDefinition,
    #[serde(rename = "runDetails")]
    pub run_details: RunDetails,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildDefinition {
    #[serde(rename = "buildType")]
    pub build_type: String,
    /// What the submitter chose: the job file, the image, the declared packages and caches.
    #[serde(rename = "externalParameters")]
    pub external_parameters: External,
    /// What the host chose: QEMU, the accelerator, CPUs, memory, the jail.
    #[serde(rename = "internalParameters")]
    pub internal_parameters: Machine,
    /// Everything that went into the VM, by digest.
    #[serde(rename = "resolvedDependencies", default)]
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDetails {
    pub builder: Builder,
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub byproducts: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Builder {
    pub id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub version: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(rename = "invocationId", default, skip_serializing_if = "String::is_empty")]
    pub invocation_id: String,
    #[serde(rename = "startedOn", default, skip_serializing_if = "String::is_empty")]
    pub started_on: String,
    #[serde(rename = "finishedOn", default, skip_serializing_if = "String::is_empty")]
    pub finished_on: String,
}

/// A sha256, as in-toto writes a digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sha256 {
    pub sha256: String,
}

/// The build's external parameters: what the submitter chose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct External {
    pub job: JobParameter,
    pub image: ImageParameter,
    /// The declared packages, as written.
    #[serde(default)]
    pub packages: Vec<String>,
    /// The declared build caches' names.
    #[serde(default)]
    pub caches: Vec<String>,
    /// A verified rebuild's terms, when the job is one of its runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildParameter>,
    /// The job ran as a debug job: had it not ended ok, its VM would have
    /// stayed up for its owner's shell after the result was taken (the
    /// result is what the job made; a session comes after it). Such a run
    /// gets no verified rebuild.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub debug: bool,
    /// The variables that vary between jobs as the server fixed them from
    /// the job's inputs (`CONSTRUIR_JOB`, `SOURCE_DATE_EPOCH`); empty for a
    /// job put in the queue by hand, which sees its file's name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
}

/// The job file, by name and digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobParameter {
    pub name: String,
    pub digest: Sha256,
}

/// The base image, by name and its manifest's digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageParameter {
    pub name: String,
    pub manifest: Sha256,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub suite: Option<String>,
}

/// What both runs of a verified rebuild are given alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildParameter {
    pub name: String,
    pub source_date_epoch: u64,
    pub other_run: String,
}

fn amd64() -> String {
    "amd64".into()
}

/// The build's internal parameters: the machine the host made for the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    /// The QEMU version, as `major.minor`.
    pub qemu: String,
    /// The guest's architecture, by Debian's name (`amd64`, `arm64`; `amd64` in statements from before it was named).
    #[serde(default = "amd64")]
    pub architecture: String,
    /// The QEMU program that ran it (`qemu-system-aarch64`).
    #[serde(default)]
    pub emulator: String,
    pub accelerator: String,
    pub cpus: u32,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    pub networking: bool,
    pub timeout_secs: u64,
    /// The confinement layers.
    pub jail: String,
}
