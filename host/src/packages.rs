//! A job's packages on the host: its `construir.toml` read from the job
//! file (never trusted further than Debian's grammar), resolved by apt
//! against its image (`deps`), and the layer that holds them found or
//! planned. Everything that can refuse a job does so here, before any VM
//! boots, with the reason the job goes to `failed/` with.

use std::collections::HashSet;
use std::fs::File;
use std::time::Duration;

use deps::{Fetched, Resolver};
use jobfile::deps::{Declaration, Resolution};

use crate::files::ReadAt;
use crate::image::Image;
use crate::layers::{Layer, Layers};
use crate::stages::Stages;

/// What a host uses to give jobs their packages.
#[derive(Debug)]
pub struct Packages {
    pub resolver: Resolver,
    pub layers: Layers,
}

/// What a job's VM boots from.
#[derive(Debug)]
pub enum Plan {
    /// It declares nothing: the image as it is.
    Plain,
    /// It declares packages the image already has all of.
    Satisfied,
    /// Its layer exists.
    Layer(Layer),
    /// Its layer is to be built first, from these files.
    Build { key: String, resolution: Resolution, fetched: Fetched },
}

impl Plan {
    /// Whether the host read the job's declaration (the guest is told).
    pub fn declared(&self) -> bool {
        !matches!(self, Plan::Plain)
    }
}

/// Why a job has no plan.
#[derive(Debug, PartialEq, Eq)]
pub enum NoPlan {
    /// Its packages cannot be had: why, for its `.reason`.
    Refused(String),
    /// `halt` said to stop (the host is stopping, or the job was cancelled)
    /// while apt worked: nothing is wrong with the job.
    Halted,
}

impl From<String> for NoPlan {
    fn from(why: String) -> NoPlan {
        NoPlan::Refused(why)
    }
}

impl From<deps::ResolveError> for NoPlan {
    fn from(e: deps::ResolveError) -> NoPlan {
        if e.is_halted() {
            NoPlan::Halted
        } else {
            NoPlan::Refused(jobfile::error_chain(&e))
        }
    }
}

/// Build directories older than this were left by a host that died.
const STALE_BUILD: Duration = Duration::from_secs(24 * 3600);

/// The job's declaration (`construir.toml`, the archive's first file) and
/// every relation it comes to, read once from the start of the job disk;
/// `Err` is why the job is refused.
pub fn read_declaration(disk: &File) -> Result<Option<(Declaration, Vec<String>)>, String> {
    match jobfile::deps::read_from_job(ReadAt::new(disk)) {
        // An archive that cannot be read declares nothing readable: the guest reports it (bad_archive).
        Err(jobfile::deps::DepsError::Archive(_)) => Ok(None),
        other => other.map_err(|e| jobfile::error_chain(&e)),
    }
}

/// Plans the packages of the job that declared `declared`; `halt` is asked
/// while apt resolves or downloads.
pub fn plan(
    packages: Option<&Packages>,
    image: &Image,
    declared: Option<&(Declaration, Vec<String>)>,
    label: &str,
    pinned: Option<Resolution>,
    halt: &dyn Fn() -> bool,
    stages: &mut Stages,
) -> Result<Plan, NoPlan> {
    let Some((_, relations)) = declared else { return Ok(Plan::Plain) };
    // A declaration of caches alone, or of an empty list, asks for no package.
    if relations.is_empty() {
        return Ok(Plan::Satisfied);
    }
    let Some(packages) = packages else {
        return Err(NoPlan::Refused(format!(
            "the job declares packages in {}, and this host installs none (its package cache is off)",
            jobfile::deps::DECLARATION
        )));
    };
    let manifest = &image.manifest;
    let started = std::time::Instant::now();
    let resolution = match pinned {
        // The server resolved it at submit: exactly those versions.
        Some(pinned) => {
            log::info!("job {label}: {} packages pinned by the server at submit", pinned.install.len());
            pinned
        }
        None => packages.resolver.resolve(&image.number, &image.dir, manifest, relations, halt)?,
    };
    stages.before_vm("resolve", started.elapsed());
    log::info!(
        "job {label}: {} relations resolved to {} packages to install{} in {:.1} s",
        relations.len(),
        resolution.install.len(),
        if resolution.remove.is_empty() { String::new() } else { format!(", {} to remove", resolution.remove.len()) },
        started.elapsed().as_secs_f64()
    );
    if resolution.install.is_empty() && resolution.remove.is_empty() {
        return Ok(Plan::Satisfied);
    }
    let base = base_sha256(image).ok_or_else(|| format!("image i{} lists no sha256 of its root disk", image.number))?;
    let key = resolution.layer_key(&base);
    let found = packages.layers.find(&key).map_err(|e| format!("cannot read layer {key}: {e}"))?;
    let keep = HashSet::from([key.clone()]);
    if let Err(e) = packages.layers.evict(&keep, STALE_BUILD) {
        log::warn!("cannot trim the layers in {}: {e}", packages.layers.dir().display());
    }
    if let Some(layer) = found {
        packages.layers.touch(&layer);
        return Ok(Plan::Layer(layer));
    }
    let fetching = std::time::Instant::now();
    let fetched = packages.resolver.fetch(&image.number, manifest, &resolution, halt)?;
    stages.before_vm("fetch", fetching.elapsed());
    log::info!(
        "job {label}: {} packages ready ({} from the cache, {} downloaded); building layer {key}",
        fetched.files.len(),
        fetched.hits,
        fetched.downloaded
    );
    Ok(Plan::Build { key, resolution, fetched })
}

/// The image's root disk sha256, as its manifest records it.
pub fn base_sha256(image: &Image) -> Option<String> {
    let root = image.manifest.root_disk.as_ref()?;
    image.manifest.sha256.get(root).cloned()
}
