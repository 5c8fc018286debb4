//! A job's build dependencies, as it declares them: `construir.toml` at the
//! root of the job (the one file for job options; today it holds only
//! these), with Debian relations, or a pointer to a Debian source package's
//! `debian/control` whose `Build-Depends`, `-Arch` and `-Indep` are taken.
//!
//! ```toml
//! packages = ["libssl-dev", "pkg-config (>= 1.8)", "cmake | cmake-mozilla"]
//! debian-control = "hello/debian/control"
//! ```
//!
//! Everything here is checked against Debian's grammar for relations
//! (Policy 7.1: names, version relations, architecture restrictions, build
//! profiles) before any resolver sees it; resolving is Debian's own (apt,
//! on the host), never ours.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The declaration's path in a job, relative to `/job`.
pub const DECLARATION: &str = "construir.toml";
/// Largest `construir.toml` read.
pub const MAX_DECLARATION: u64 = 64 << 10;
/// Largest `debian/control` read.
pub const MAX_CONTROL: u64 = 256 << 10;
/// On the package disk a layer is built from: the resolution, and each
/// `.deb` as `debs/<sha256>.deb` (written by the host, read by construir-init).
pub const DISK_RESOLUTION: &str = "packages.json";
pub const DISK_DEBS: &str = "debs";
/// In a layer's root: what was installed into it (the resolution).
pub const LAYER_RECORD: &str = "/etc/construir/packages.json";
/// In a layer's directory (`cache/layers/<key>/`): the overlay and its record.
pub const LAYER_DISK: &str = "layer.qcow2";
pub const LAYER_FILE: &str = "layer.toml";

/// What a layer is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub key: String,
    /// The image it was built on (its number then), and its root disk's sha256.
    pub image: String,
    pub base_sha256: String,
    pub install: Vec<Pinned>,
    #[serde(default)]
    pub remove: Vec<String>,
    /// RFC 3339, UTC.
    pub created: String,
    /// The overlay's sha256 and size when it was built.
    pub sha256: String,
    pub bytes: u64,
}

/// A layer's directory as listed: its record, and when a job last booted
/// from it (its record's mtime, which the host touches on each use).
#[derive(Debug, Clone)]
pub struct Layer {
    pub dir: std::path::PathBuf,
    pub record: LayerRecord,
    pub used: std::time::SystemTime,
}

impl Layer {
    pub fn disk(&self) -> std::path::PathBuf {
        self.dir.join(LAYER_DISK)
    }
}

/// The layers under `dir` (`cache/layers/`), most recently used first:
/// records only, nothing hashed; build directories and unreadable records left out.
pub fn list_layers(dir: &std::path::Path) -> Vec<Layer> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<Layer> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let file = e.path().join(LAYER_FILE);
            let record = toml::from_str::<LayerRecord>(&std::fs::read_to_string(&file).ok()?).ok()?;
            let used = std::fs::metadata(&file).and_then(|m| m.modified()).ok()?;
            Some(Layer { dir: e.path(), record, used })
        })
        .collect();
    out.sort_by_key(|l| std::cmp::Reverse(l.used));
    out
}

/// A layer as `construir-host status` and `image-builder list` show it,
/// every text already through the one sanitizer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerSummary {
    pub key: String,
    /// The image it was built on (`i<number>`).
    pub image: String,
    pub packages: usize,
    pub bytes: u64,
    /// RFC 3339, UTC.
    pub created: String,
    /// RFC 3339, UTC: when a job last booted from it.
    pub used: String,
}

/// `list_layers`, summarized.
pub fn layer_summaries(dir: &std::path::Path) -> Vec<LayerSummary> {
    list_layers(dir)
        .into_iter()
        .map(|l| LayerSummary {
            key: crate::sanitize(l.record.key.as_bytes()),
            image: format!("i{}", crate::sanitize(l.record.image.as_bytes())),
            packages: l.record.install.len(),
            bytes: l.record.bytes,
            created: crate::sanitize(l.record.created.as_bytes()),
            used: crate::units::rfc3339(l.used),
        })
        .collect()
}

/// Most relations a job may declare (all sources together).
pub const MAX_RELATIONS: usize = 256;
/// Longest relation taken (one entry, with its alternatives).
pub const MAX_RELATION_LEN: usize = 1024;

/// What `construir.toml` says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Declaration {
    /// Debian relations, each as one entry of a `Build-Depends` field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// A `debian/control` inside the job whose build dependencies are added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debian_control: Option<String>,
    /// Build caches the job uses (`crate::caches`), each mounted at `/cache/<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<String>,
    /// When the job does not end ok, keep its VM up for a debug session (`crate::debug`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub debug: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DepsError {
    #[error("{DECLARATION} is not valid: {0}")]
    Toml(String),
    #[error("{DECLARATION} is larger than {MAX_DECLARATION} bytes")]
    DeclarationTooLarge,
    #[error("debian-control {path:?} is not a path inside the job")]
    ControlPath { path: String },
    #[error("{path} is larger than {MAX_CONTROL} bytes")]
    ControlTooLarge { path: String },
    #[error("{path} has no Source stanza (its first paragraph must start with `Source:`)")]
    NoSource { path: String },
    #[error("{path}, line {line}: {why}")]
    Control { path: String, line: usize, why: String },
    #[error("relation {relation:?}: {why}")]
    Relation { relation: String, why: String },
    #[error("{count} relations declared; at most {MAX_RELATIONS} are taken")]
    TooMany { count: usize },
    #[error("cannot read the job archive: {0}")]
    Archive(String),
    #[error("{0}")]
    Caches(String),
    #[error("debian-control names {path}, which the job archive does not hold as a regular file")]
    ControlMissing { path: String },
    #[error(
        "debian-control names {path}, which is not within the archive's first {} MiB ({why}): \
         put it near the start (construir-host job pack does)", SCAN_BYTES >> 20
    )]
    ControlTooFar { path: String, why: String },
}

/// What reading a job's declaration may cost, on every submission and
/// every claim: the declaration is its first file, and the
/// `debian/control` it names must come within the archive's first
/// 256 MiB (`job pack` puts its top directory right after the declaration).
/// A job's own archive, not a result: paths are not kept (the guest, which
/// unpacks it, does not keep them either).
pub const SCAN_LIMITS: crate::ReadLimits =
    crate::ReadLimits { unique_paths: false, ..crate::ReadLimits::new(SCAN_BYTES, std::time::Duration::from_secs(20)) };
/// How far into a job's archive its `debian/control` may be.
pub const SCAN_BYTES: u64 = 256 << 20;

/// A job's declaration, read from its job file: `construir.toml` must be
/// the archive's first file (directories before it aside; `job pack` puts
/// it there), so a job without one costs one entry's read. Returns the
/// declaration and every relation it comes to, checked; `None` when the
/// job declares nothing.
pub fn read_from_job<R: std::io::Read>(input: R) -> Result<Option<(Declaration, Vec<String>)>, DepsError> {
    use std::io::Read as _;
    let bad = |e: &dyn std::error::Error| DepsError::Archive(crate::error_chain(e));
    let mut archive =
        crate::read_job(input, crate::xz::DEFAULT_MEMLIMIT).map_err(|e| bad(&e))?.with_limits(SCAN_LIMITS);
    let declaration = loop {
        let Some(h) = archive.next_entry().map_err(|e| bad(&e))? else { return Ok(None) };
        match h.kind {
            crate::Kind::Dir => continue,
            crate::Kind::File if crate::path_is(&h.path, DECLARATION) => {
                if h.size > MAX_DECLARATION {
                    return Err(DepsError::DeclarationTooLarge);
                }
                let mut text = String::new();
                archive.data().take(MAX_DECLARATION).read_to_string(&mut text).map_err(|e| bad(&e))?;
                break Declaration::parse(&text)?;
            }
            _ => return Ok(None),
        }
    };
    let Some(path) = declaration.debian_control.clone() else {
        let relations = relations(&declaration, None)?;
        return Ok(Some((declaration, relations)));
    };
    let too_far = |e: crate::ArchiveError, path: &str| match e {
        e @ (crate::ArchiveError::TooMuchData { .. } | crate::ArchiveError::TooSlow { .. }) => {
            DepsError::ControlTooFar { path: path.to_owned(), why: e.to_string() }
        }
        e => bad(&e),
    };
    while let Some(h) = archive.next_entry().map_err(|e| too_far(e, &path))? {
        if h.kind == crate::Kind::File && crate::path_is(&h.path, &path) {
            if h.size > MAX_CONTROL {
                return Err(DepsError::ControlTooLarge { path });
            }
            let mut text = String::new();
            archive.data().take(MAX_CONTROL).read_to_string(&mut text).map_err(|e| bad(&e))?;
            let relations = relations(&declaration, Some((&path, &text)))?;
            return Ok(Some((declaration, relations)));
        }
    }
    Err(DepsError::ControlMissing { path })
}

/// One package a resolution chose, exactly: what the VM installs and what
/// `job_status.json` reports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Pinned {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// Its `.deb`'s sha256, from the archive's `Packages` (verified through
    /// the signed `Release`).
    pub sha256: String,
    pub size: u64,
    /// Its path in the archive (`pool/main/...`).
    pub filename: String,
}

/// What a job's relations resolved to, against one image: every package
/// to install, sorted, and what installing them removes from the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub install: Vec<Pinned>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl Resolution {
    /// Whether every name, version, digest and path in it is what Debian's
    /// grammar and the archive allow (it may come from a file another
    /// program wrote, and its names reach apt's command line in the VM).
    pub fn check(&self) -> Result<(), String> {
        for p in &self.install {
            check_name(&p.name)?;
            check_version(&p.version)?;
            if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{}: {:?} is not a sha256", p.name, p.sha256));
            }
            // It is fetched as `<archive>/<filename>`: a plain relative path in the
            // characters Debian's pool uses, nothing a URI would read otherwise.
            if !p.filename.starts_with("pool/")
                || !p.filename.ends_with(".deb")
                || p.filename.len() > 512
                || p.filename.split('/').any(|c| c == ".." || c == "." || c.is_empty())
                || !p.filename.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-._~/".contains(&b))
            {
                return Err(format!("{}: {:?} is not a path in an archive's pool", p.name, p.filename));
            }
            if p.architecture.is_empty()
                || !p.architecture.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(format!("{}: {:?} is not an architecture", p.name, p.architecture));
            }
        }
        for name in &self.remove {
            check_name(name)?;
        }
        Ok(())
    }

    /// The layer this resolution makes on the image whose root disk has
    /// sha256 `image`: a digest of both, so that the same set on the same
    /// image is the same layer on every host.
    pub fn layer_key(&self, image: &str) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"construir layer 1\n");
        h.update(image.as_bytes());
        for p in &self.install {
            h.update(format!("\ninstall {} {} {} {}", p.name, p.version, p.architecture, p.sha256));
        }
        for r in &self.remove {
            h.update(format!("\nremove {r}"));
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Declaration {
    /// Parses `construir.toml` and checks every relation it holds.
    pub fn parse(text: &str) -> Result<Declaration, DepsError> {
        if text.len() as u64 > MAX_DECLARATION {
            return Err(DepsError::DeclarationTooLarge);
        }
        let d: Declaration = toml::from_str(text).map_err(|e| DepsError::Toml(e.message().to_owned()))?;
        if let Some(path) = &d.debian_control {
            if crate::unpack::split_path(path.as_bytes()).is_err() || path.is_empty() {
                return Err(DepsError::ControlPath { path: path.clone() });
            }
        }
        check_count(d.packages.len())?;
        for r in &d.packages {
            check_relation(r)?;
        }
        crate::caches::check_names(&d.caches).map_err(DepsError::Caches)?;
        Ok(d)
    }

    /// The file as `job pack --packages` writes it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a declaration always serializes")
    }

    /// Whether it declares no packages (it may still name caches).
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty() && self.debian_control.is_none()
    }
}

/// Every relation a job needs: those declared in `packages`, then those in
/// `control` (the text of the file `debian-control` names, at `path`),
/// each checked; at most `MAX_RELATIONS`.
pub fn relations(d: &Declaration, control: Option<(&str, &str)>) -> Result<Vec<String>, DepsError> {
    let mut all = d.packages.iter().map(|r| r.trim().to_owned()).collect::<Vec<_>>();
    if let Some((path, text)) = control {
        all.extend(build_depends(path, text)?);
    }
    check_count(all.len())?;
    Ok(all)
}

fn check_count(count: usize) -> Result<(), DepsError> {
    if count > MAX_RELATIONS {
        return Err(DepsError::TooMany { count });
    }
    Ok(())
}

/// The relations in the source stanza's `Build-Depends`, `Build-Depends-Arch`
/// and `Build-Depends-Indep` of a `debian/control` (deb822: fields folded
/// over continuation lines, `#` comments dropped), each checked.
pub fn build_depends(path: &str, text: &str) -> Result<Vec<String>, DepsError> {
    if text.len() as u64 > MAX_CONTROL {
        return Err(DepsError::ControlTooLarge { path: path.to_owned() });
    }
    let at = |line: usize, why: &str| DepsError::Control { path: path.to_owned(), line, why: why.to_owned() };
    // The first paragraph only: the source stanza.
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut started = false;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if started {
                break;
            }
            continue;
        }
        started = true;
        if line.starts_with([' ', '\t']) {
            let Some((_, value)) = fields.last_mut() else { return Err(at(n, "a continuation line before any field")) };
            value.push(' ');
            value.push_str(line.trim());
            continue;
        }
        let Some((name, value)) = line.split_once(':') else { return Err(at(n, "not `Field: value`")) };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(at(n, "a field name must be printable ASCII without spaces"));
        }
        fields.push((name.to_owned(), value.trim().to_owned()));
    }
    if !fields.first().is_some_and(|(name, _)| name.eq_ignore_ascii_case("Source")) {
        return Err(DepsError::NoSource { path: path.to_owned() });
    }
    let mut out = Vec::new();
    for (name, value) in &fields {
        let wanted = ["Build-Depends", "Build-Depends-Arch", "Build-Depends-Indep"];
        if !wanted.iter().any(|w| w.eq_ignore_ascii_case(name)) {
            continue;
        }
        for relation in value.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            check_relation(relation)?;
            out.push(relation.to_owned());
        }
    }
    Ok(out)
}

/// Checks one relation: alternatives `a | b`, each a package name with an
/// optional `:arch` qualifier, an optional `(op version)`, an optional
/// `[arch ...]` restriction and any number of `<profile ...>` lists.
pub fn check_relation(relation: &str) -> Result<(), DepsError> {
    let bad = |why: String| DepsError::Relation { relation: relation.to_owned(), why };
    if relation.len() > MAX_RELATION_LEN {
        return Err(bad(format!("longer than {MAX_RELATION_LEN} bytes")));
    }
    if relation.contains(',') {
        return Err(bad("one relation per entry: split it at the commas".to_owned()));
    }
    for alternative in relation.split('|') {
        check_alternative(alternative.trim()).map_err(bad)?;
    }
    Ok(())
}

fn check_alternative(text: &str) -> Result<(), String> {
    let mut rest = text;
    let name_end = rest.find(|c: char| c.is_whitespace() || "([<:".contains(c)).unwrap_or(rest.len());
    let (name, tail) = rest.split_at(name_end);
    check_name(name)?;
    rest = tail;
    if let Some(tail) = rest.strip_prefix(':') {
        let end = tail.find(|c: char| c.is_whitespace() || "([<".contains(c)).unwrap_or(tail.len());
        let (arch, tail) = tail.split_at(end);
        check_arch(arch).map_err(|e| format!("architecture qualifier: {e}"))?;
        rest = tail;
    }
    rest = rest.trim_start();
    if let Some(tail) = rest.strip_prefix('(') {
        let (inside, tail) = tail.split_once(')').ok_or("`(` without `)`")?;
        let inside = inside.trim();
        let op = ["<<", "<=", ">=", ">>", "="].into_iter().find(|op| inside.starts_with(op));
        let op = op.ok_or_else(|| format!("{inside:?}: a version relation is one of << <= = >= >>"))?;
        check_version(inside[op.len()..].trim())?;
        rest = tail.trim_start();
    }
    if let Some(tail) = rest.strip_prefix('[') {
        let (inside, tail) = tail.split_once(']').ok_or("`[` without `]`")?;
        let archs: Vec<&str> = inside.split_whitespace().collect();
        if archs.is_empty() {
            return Err("an empty architecture restriction `[]`".to_owned());
        }
        let negated = archs.iter().filter(|a| a.starts_with('!')).count();
        if negated != 0 && negated != archs.len() {
            return Err("an architecture restriction is all negated or none".to_owned());
        }
        for a in archs {
            check_arch(a.strip_prefix('!').unwrap_or(a))?;
        }
        rest = tail.trim_start();
    }
    while let Some(tail) = rest.strip_prefix('<') {
        let (inside, tail) = tail.split_once('>').ok_or("`<` without `>`")?;
        let terms: Vec<&str> = inside.split_whitespace().collect();
        if terms.is_empty() {
            return Err("an empty build profile `<>`".to_owned());
        }
        for t in terms {
            let p = t.strip_prefix('!').unwrap_or(t);
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b)) {
                return Err(format!("{t:?} is not a build profile name"));
            }
        }
        rest = tail.trim_start();
    }
    if !rest.is_empty() {
        return Err(format!("unexpected {rest:?}"));
    }
    Ok(())
}

/// A Debian package name: lower-case letters, digits, `+ - .`, at least
/// two, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() >= 2
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    if ok {
        Ok(())
    } else if name.is_empty() {
        Err("no package name".to_owned())
    } else {
        Err(format!("{name:?} is not a Debian package name (lower-case letters, digits, + - ., at least two)"))
    }
}

/// A Debian version: `[epoch:]upstream[-revision]`, the upstream part
/// starting with a digit.
pub fn check_version(version: &str) -> Result<(), String> {
    let bad = || format!("{version:?} is not a Debian version");
    let (epoch, rest) = match version.split_once(':') {
        Some((e, r)) => (Some(e), r),
        None => (None, version),
    };
    if epoch.is_some_and(|e| e.is_empty() || !e.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad());
    }
    let upstream = rest.rsplit_once('-').map_or(rest, |(u, revision)| {
        if revision.is_empty() || !revision.bytes().all(|b| b.is_ascii_alphanumeric() || b"+.~".contains(&b)) {
            ""
        } else {
            u
        }
    });
    let ok = upstream.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && upstream.bytes().all(|b| b.is_ascii_alphanumeric() || b"+.~-:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

fn check_arch(arch: &str) -> Result<(), String> {
    if !arch.is_empty() && arch.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Ok(())
    } else {
        Err(format!("{arch:?} is not an architecture name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relations_in_debian_grammar_are_taken_and_others_refused_with_why() {
        let good = [
            "libssl-dev",
            "pkg-config (>= 1.8)",
            "cmake | cmake-mozilla",
            "debhelper-compat (= 13)",
            "libc6-dev (>= 2.36-9+deb12u1) [amd64]",
            "python3:any",
            "foo [!i386 !armel] <!nocheck>",
            "bar <!nocheck> <cross>",
            "g++ (<< 1:14~)",
        ];
        for r in good {
            assert_eq!(check_relation(r), Ok(()), "{r}");
        }
        let bad = [
            ("", "no package name"),
            ("Libssl", "not a Debian package name"),
            ("a", "not a Debian package name"),
            ("foo (>= )", "not a Debian version"),
            ("foo (~ 1)", "version relation is one of"),
            ("foo (>= 1", "without `)`"),
            ("foo, bar", "one relation per entry"),
            ("foo [amd64 !i386]", "all negated or none"),
            ("foo []", "empty architecture"),
            ("foo <>", "empty build profile"),
            ("foo; rm -rf /", "not a Debian package name"),
            ("foo (>= 1) extra", "unexpected"),
            ("foo | ", "no package name"),
            ("$(reboot)", "not a Debian package name"),
        ];
        for (r, why) in bad {
            let e = check_relation(r).expect_err(r).to_string();
            assert!(e.contains(why), "{r:?}: {e}");
        }
        assert!(check_relation(&"a".repeat(MAX_RELATION_LEN + 1)).is_err());
    }

    #[test]
    fn versions_follow_debian_policy() {
        for v in ["1.0", "2:1.2.3-4", "1.0~rc1-1+deb12u1", "3.0.15-1~deb12u1", "0"] {
            assert_eq!(check_version(v), Ok(()), "{v}");
        }
        for v in ["", "a1.0", ":1.0", "x:1", "1.0-", "1.0-a_b", "-1"] {
            assert!(check_version(v).is_err(), "{v}");
        }
    }

    #[test]
    fn a_resolution_is_checked_before_its_names_and_paths_are_used() {
        let good = Pinned {
            name: "pkgconf".into(),
            version: "1.8.1-1".into(),
            architecture: "amd64".into(),
            sha256: "4e3ce982b5fedc6c6119268435504a64f5ffcc6d93aaecaea902d816eba1215f".into(),
            size: 25892,
            filename: "pool/main/p/pkgconf/pkgconf_1.8.1-1_amd64.deb".into(),
        };
        let with = |f: &dyn Fn(&mut Pinned)| {
            let mut p = good.clone();
            f(&mut p);
            Resolution { install: vec![p], remove: Vec::new() }.check()
        };
        assert_eq!(with(&|_| {}), Ok(()));
        assert_eq!(with(&|p| p.filename = "pool/main/g/gcc-12/g++-12_12.2.0-14+deb12u1~x_amd64.deb".into()), Ok(()));
        for bad in [
            "pool/main/p/../../../etc/passwd.deb",
            "pool/main/p/./x.deb",
            "pool//x.deb",
            "/pool/main/x.deb",
            "dists/bookworm/Release",
            "pool/main/x.deb?y=1.deb",
            "pool/main/x.deb#.deb",
            "pool/main/x%2F.deb",
            "pool/main/x y.deb",
            "pool/main/x.deb\n.deb",
            "pool/main/x.tar",
        ] {
            let got = with(&|p| p.filename = bad.into());
            assert!(got.as_ref().is_err_and(|e| e.contains("not a path in an archive's pool")), "{bad:?}: {got:?}");
        }
        assert!(with(&|p| p.filename = format!("pool/{}.deb", "a".repeat(600))).is_err(), "too long");
        assert!(with(&|p| p.sha256 = "ABC".into()).is_err());
        assert!(with(&|p| p.name = "Bad Name".into()).is_err());
        assert!(with(&|p| p.version = "1.0 ; rm".into()).is_err());
        assert!(with(&|p| p.architecture = "amd64 all".into()).is_err());
    }

    #[test]
    fn the_declaration_file_is_checked_and_round_trips() {
        let d = Declaration::parse("packages = [\"libssl-dev\", \"pkg-config (>= 1.8)\"]\n").expect("parse");
        assert_eq!(d.packages, ["libssl-dev", "pkg-config (>= 1.8)"]);
        assert_eq!(Declaration::parse(&d.to_toml()), Ok(d.clone()));
        assert!(!d.is_empty() && Declaration::default().is_empty());
        let e = Declaration::parse("packages = [\"BAD\"]").expect_err("bad name").to_string();
        assert!(e.contains("\"BAD\" is not a Debian package name"), "{e}");
        let e = Declaration::parse("pakages = []").expect_err("unknown key").to_string();
        assert!(e.contains("unknown field `pakages`"), "{e}");
        for path in ["../etc/debian/control", "/etc/control", ""] {
            let text = format!("debian-control = {path:?}");
            assert!(matches!(Declaration::parse(&text), Err(DepsError::ControlPath { .. })), "{path}");
        }
        let many = format!("packages = [{}]", vec!["\"make\""; MAX_RELATIONS + 1].join(","));
        assert_eq!(Declaration::parse(&many), Err(DepsError::TooMany { count: MAX_RELATIONS + 1 }));
        let huge = format!("# {}\n", "x".repeat(MAX_DECLARATION as usize));
        assert_eq!(Declaration::parse(&huge), Err(DepsError::DeclarationTooLarge));
        // Caches: named, checked, and no packages needed beside them.
        let c = Declaration::parse("caches = [\"ccache\", \"cargo\"]\n").expect("caches");
        assert_eq!((c.caches.as_slice(), c.is_empty()), (["ccache".to_owned(), "cargo".to_owned()].as_slice(), true));
        assert_eq!(Declaration::parse(&c.to_toml()), Ok(c));
        for bad in ["caches = [\"../x\"]", "caches = [\"a\", \"a\"]", "caches = [\"UP\"]"] {
            assert!(matches!(Declaration::parse(bad), Err(DepsError::Caches(_))), "{bad}");
        }
    }

    #[test]
    fn build_dependencies_come_from_the_source_stanza_of_debian_control() {
        let control = "\
# a comment
Source: hello
Section: devel
Build-Depends: debhelper-compat (= 13),
 libssl-dev <!nocheck>,
# a comment inside the field
    pkg-config,
Build-Depends-Indep: python3-sphinx
Build-Depends-Arch: libfoo-dev [amd64]

Package: hello
Depends: not-a-build-dependency
Build-Depends: not-read-either
";
        let got = build_depends("debian/control", control).expect("parse");
        assert_eq!(
            got,
            ["debhelper-compat (= 13)", "libssl-dev <!nocheck>", "pkg-config", "python3-sphinx", "libfoo-dev [amd64]"]
        );
        let d = Declaration {
            packages: vec!["make".into()],
            debian_control: Some("debian/control".into()),
            caches: Vec::new(),
            debug: false,
        };
        assert_eq!(relations(&d, Some(("debian/control", control))).expect("all").len(), 6);
        let e = build_depends("c", "Package: x\n").expect_err("no source").to_string();
        assert!(e.contains("no Source stanza"), "{e}");
        let e = build_depends("c", "Source: x\nBuild-Depends: ok, Bad!\n").expect_err("bad").to_string();
        assert!(e.contains("\"Bad!\""), "{e}");
        let e = build_depends("c", " folded\nSource: x\n").expect_err("bad").to_string();
        assert!(e.contains("line 1: a continuation line"), "{e}");
    }

    fn pack(
        dir: &std::path::Path,
        packages: &[&str],
        control: Option<&str>,
    ) -> Result<std::path::PathBuf, crate::tools::JobToolError> {
        let req = crate::tools::PackRequest {
            dir: dir.to_owned(),
            image: "1".into(),
            size: 1 << 20,
            name: Some("deps".into()),
            out: dir.parent().expect("parent").to_owned(),
            preset: 0,
            force: true,
            packages: packages.iter().map(|p| p.to_string()).collect(),
            debian_control: control.map(str::to_owned),
            caches: Vec::new(),
            debug: false,
        };
        crate::tools::pack(&req).map(|p| p.path)
    }

    #[test]
    fn job_pack_writes_the_declaration_first_and_the_host_reads_it_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("job");
        std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
        std::fs::create_dir_all(dir.join("src/debian")).expect("mkdir");
        std::fs::write(dir.join("bin/construir"), "#!/bin/sh\n").expect("w");
        // Sorted, "a-first" would come before construir.toml: the declaration is put first anyway.
        std::fs::write(dir.join("a-first"), "x").expect("w");
        std::fs::write(dir.join("src/debian/control"), "Source: s\nBuild-Depends: debhelper-compat (= 13)\n")
            .expect("w");
        let read = |file: &std::path::Path| read_from_job(std::fs::File::open(file).expect("open"));

        let file = pack(&dir, &["libssl-dev", "pkg-config (>= 1.8)"], Some("src/debian/control")).expect("pack");
        let (d, relations) = read(&file).expect("read").expect("declared");
        assert_eq!(d.debian_control.as_deref(), Some("src/debian/control"));
        assert_eq!(relations, ["libssl-dev", "pkg-config (>= 1.8)", "debhelper-compat (= 13)"]);

        // Without flags: nothing declared, nothing read.
        let file = pack(&dir, &[], None).expect("pack");
        assert_eq!(read(&file).expect("read"), None);

        // Caches alone are a declaration too, written first.
        let req = crate::tools::PackRequest {
            dir: dir.clone(),
            image: "1".into(),
            size: 1 << 20,
            name: Some("deps".into()),
            out: tmp.path().to_owned(),
            preset: 0,
            force: true,
            packages: Vec::new(),
            debian_control: None,
            caches: vec!["ccache".into(), " cargo ".into()],
            debug: false,
        };
        let file = crate::tools::pack(&req).expect("pack").path;
        let (d, relations) = read(&file).expect("read").expect("declared");
        assert_eq!((d.caches.as_slice(), relations.len()), (["ccache".to_owned(), "cargo".to_owned()].as_slice(), 0));
        let bad = crate::tools::PackRequest { caches: vec!["../up".into()], ..req.clone() };
        assert!(crate::error_chain(&crate::tools::pack(&bad).expect_err("bad")).contains("not a cache name"));

        // --debug with DIR's own construir.toml: that file, with `debug = true` added, first.
        std::fs::write(dir.join(DECLARATION), "caches = [\"pip\"]\n").expect("write");
        let debug = crate::tools::PackRequest { caches: Vec::new(), debug: true, ..req };
        let file = crate::tools::pack(&debug).expect("pack").path;
        let (d, _) = read(&file).expect("read").expect("declared");
        assert_eq!((d.caches.as_slice(), d.debug), (["pip".to_owned()].as_slice(), true));

        // DIR's own construir.toml is checked, put first, and cannot be combined with the flags.
        std::fs::write(dir.join(DECLARATION), "packages = [\"cmake\"]\n").expect("w");
        let file = pack(&dir, &[], None).expect("pack");
        assert_eq!(read(&file).expect("read").expect("declared").1, ["cmake"]);
        let e = pack(&dir, &["make"], None).expect_err("both");
        assert!(e.to_string().contains("already has construir.toml"), "{e}");
        std::fs::write(dir.join(DECLARATION), "packages = [\"Not Valid\"]\n").expect("w");
        let e = crate::error_chain(&pack(&dir, &[], None).expect_err("bad"));
        assert!(e.contains("\"Not\" is not a Debian package name"), "{e}");
        std::fs::remove_file(dir.join(DECLARATION)).expect("rm");
        let e = crate::error_chain(&pack(&dir, &["libssl-dev; reboot"], None).expect_err("bad"));
        assert!(e.contains("not a Debian package name"), "{e}");
        let e = crate::error_chain(&pack(&dir, &[], Some("nothing/debian/control")).expect_err("missing"));
        assert!(e.contains("nothing/debian/control"), "{e}");
    }

    #[test]
    fn a_control_file_past_the_scan_bound_is_refused_and_job_pack_puts_its_directory_first() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("far");
        std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
        std::fs::create_dir_all(dir.join("zz/debian")).expect("mkdir");
        std::fs::write(dir.join("bin/construir"), "#!/bin/sh\n").expect("w");
        std::fs::write(dir.join("zz/debian/control"), "Source: s\nBuild-Depends: make\n").expect("w");
        // Sorted, "big" comes before "zz": past the bound, unless the control's directory is put first.
        let big = std::fs::File::create(dir.join("big")).expect("big");
        big.set_len(SCAN_BYTES + (16 << 20)).expect("size");
        let file = pack(&dir, &[], Some("zz/debian/control")).expect("pack");
        let (_, relations) = read_from_job(std::fs::File::open(&file).expect("open")).expect("read").expect("declared");
        assert_eq!(relations, ["make"], "job pack puts zz/ right after the declaration");
        // The same tree packed by hand in sorted order: refused, saying where the control must be.
        std::fs::write(dir.join(DECLARATION), "debian-control = \"zz/debian/control\"\n").expect("w");
        let by_hand = tmp.path().join("hand_i1.tar.xz");
        let st = std::process::Command::new("tar")
            .args(["-cf", "-", "construir.toml", "big", "zz", "bin"])
            .current_dir(&dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|tar| {
                std::process::Command::new("xz")
                    .args(["-0", "-T1"])
                    .stdin(tar.stdout.expect("stdout"))
                    .stdout(std::fs::File::create(&by_hand).expect("create"))
                    .status()
            })
            .expect("tar | xz");
        assert!(st.success());
        let e = read_from_job(std::fs::File::open(&by_hand).expect("open")).expect_err("too far");
        assert!(matches!(e, DepsError::ControlTooFar { .. }), "{e}");
        assert!(e.to_string().contains("not within the archive's first 256 MiB"), "{e}");
    }

    #[test]
    fn a_declaration_that_is_not_the_first_file_is_not_read_and_a_missing_control_is_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("t");
        std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
        std::fs::write(dir.join("bin/construir"), "#!/bin/sh\n").expect("w");
        std::fs::write(dir.join(DECLARATION), "debian-control = \"debian/control\"\n").expect("w");
        let tar = |order: &str, out: &str| {
            let st = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("tar -cJf {out} {order}"))
                .current_dir(&dir)
                .status()
                .expect("tar");
            assert!(st.success());
            dir.join(out)
        };
        let later = tar("bin construir.toml", "later.tar.xz");
        assert_eq!(read_from_job(std::fs::File::open(later).expect("open")).expect("read"), None);
        let first = tar("construir.toml bin", "first.tar.xz");
        let e = read_from_job(std::fs::File::open(first).expect("open")).expect_err("no control");
        assert_eq!(e, DepsError::ControlMissing { path: "debian/control".into() });
    }
}
