//! The images this host has, and fetching those the server offers that it
//! lacks: installed only when every file matches the server's checksums.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use jobfile::arch::Arch;
use jobfile::image::{sha256_file, ImageManifest, MANIFEST};

use wire::client::Api;

use super::download_to;

/// The images in `images`, each as the server names it, with the sha256 of its `image.toml`.
pub fn local_images(images: &Path) -> Vec<(String, String)> {
    let Ok(dirs) = jobfile::image::image_dirs(images) else { return Vec::new() };
    dirs.into_iter()
        .filter(|(_, dir)| ImageManifest::load(dir).is_ok())
        .filter_map(|(n, dir)| Some((n, sha256_file(&dir.join(MANIFEST)).ok()?)))
        .collect()
}

/// The images in `images` whose every file matches their `image.toml`, of
/// an architecture in `archs` (those this host has a QEMU for): the only
/// ones a host tells the server it has. A mismatch is logged.
/// An image unchanged since its last check (the same files, sizes and times)
/// is not hashed again.
pub fn verified_images(images: &Path, archs: &[Arch]) -> Vec<wire::HostImage> {
    type Seen = HashMap<PathBuf, Vec<(OsString, u64, std::time::SystemTime)>>;
    static VERIFIED: Mutex<Option<Seen>> = Mutex::new(None);
    let fingerprint = |dir: &Path| -> Vec<(OsString, u64, std::time::SystemTime)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((e.file_name(), m.len(), m.modified().ok()?))
            })
            .collect();
        v.sort();
        v
    };
    let Ok(dirs) = jobfile::image::image_dirs(images) else { return Vec::new() };
    let mut out = Vec::new();
    for (n, dir) in dirs {
        let print = fingerprint(&dir);
        let known = VERIFIED.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|m| m.get(&dir).cloned());
        let manifest = match ImageManifest::load(&dir) {
            Ok(m) => m,
            Err(e) => {
                log::error!("image i{n} is not offered to the server: {}", jobfile::error_chain(&e));
                continue;
            }
        };
        if !archs.contains(&manifest.arch) {
            continue;
        }
        let checked = if known.as_ref() == Some(&print) { Ok(()) } else { manifest.verify_files(&dir) };
        if checked.is_ok() {
            VERIFIED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(HashMap::new)
                .insert(dir.clone(), print);
        }
        match (checked, sha256_file(&dir.join(MANIFEST))) {
            (Ok(()), Ok(checksum)) => out.push(wire::HostImage { name: n, checksum, arch: manifest.arch }),
            (Err(e), _) => log::error!("image i{n} is not offered to the server: {}", jobfile::error_chain(&e)),
            (_, Err(e)) => log::error!("image i{n} is not offered to the server: {e}"),
        }
    }
    out
}

/// Fetches every image the server offers that `images` lacks. An image is
/// installed only when `image.toml` has the server's checksum and every file
/// the one `image.toml` names; otherwise it is refused, and nothing of it
/// kept. Images of an architecture not in `archs` (which this host cannot
/// run) are left alone. Returns the images installed.
pub fn fetch_images(api: &Api, images: &Path, archs: &[Arch]) -> Result<Vec<String>> {
    let list: wire::ImageList = api.get("host/images").context("the server would not list its images")?;
    fs::create_dir_all(images).with_context(|| format!("cannot create {}", images.display()))?;
    let have = local_images(images);
    let mut installed = Vec::new();
    for offered in &list.images {
        let (name, checksum) = (offered.name.as_str(), offered.checksum.as_str());
        if name.is_empty() || name.len() > 9 || !name.bytes().all(|b| b.is_ascii_digit()) {
            log::warn!("the server offers an image named {:?}: ignored", jobfile::sanitize(name.as_bytes()));
            continue;
        }
        if !archs.contains(&offered.arch) {
            log::debug!("image i{name} is {}: this host has no QEMU for it, and does not fetch it", offered.arch);
            continue;
        }
        match have.iter().find(|(n, _)| n == name) {
            Some((_, c)) if c == checksum => continue,
            Some(_) => {
                log::warn!(
                    "image i{name} here differs from the server's (another image.toml): this host gets no i{name} jobs until they agree"
                );
                continue;
            }
            None => {}
        }
        if images.join(format!("i{name}")).exists() {
            log::warn!(
                "{} exists but holds no valid image: not fetching over it",
                images.join(format!("i{name}")).display()
            );
            continue;
        }
        match fetch_image(api, images, name, checksum, offered) {
            Ok(()) => {
                log::info!("image i{name}: fetched from the server, every checksum verified");
                installed.push(name.to_owned());
            }
            Err(e) => log::error!("image i{name} refused: {e:#}"),
        }
    }
    Ok(installed)
}

pub(crate) fn fetch_image(
    api: &Api,
    images: &Path,
    name: &str,
    checksum: &str,
    offered: &wire::OfferedImage,
) -> Result<()> {
    let tmp = images.join(format!(".fetch.i{name}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        if offered.files.is_empty() {
            bail!("the server listed no files");
        }
        for f in &offered.files {
            let file = f.name.as_str();
            if file.is_empty() || file.contains('/') || file.starts_with('.') {
                bail!(
                    "the server names a file {:?}, which is not a plain file name",
                    jobfile::sanitize(file.as_bytes())
                );
            }
            let size = f.size;
            download_to(api, &format!("host/images/{name}/{file}"), &tmp.join(file), size)
                .with_context(|| format!("cannot download {file}"))?;
        }
        let got = sha256_file(&tmp.join(MANIFEST)).context("no image.toml came")?;
        if !got.eq_ignore_ascii_case(checksum) {
            bail!("image.toml has sha256 {got}, the server said {checksum}: changed on the way");
        }
        let manifest = ImageManifest::load(&tmp)?;
        manifest.verify_files(&tmp)?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            fs::rename(&tmp, images.join(format!("i{name}")))
                .with_context(|| format!("cannot install {}", images.join(format!("i{name}")).display()))?;
            File::open(images)?.sync_all()?;
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
