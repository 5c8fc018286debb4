//! Build caches that outlive the throwaway VM: the contract between the
//! host, which keeps each cache as an opaque disk per (owner, image, name),
//! and the guest, which mounts it at `/cache/<name>`. A job names its
//! caches in `construir.toml` (`caches = ["ccache"]`); the host tells the
//! guest which it gives, at which version, on the kernel command line
//! (`construir.caches=ccache:3,cargo:off`), and hands each given cache as a
//! virtio disk: the n-th entry with a version (counting from 0) has the
//! serial `construir-cache<n>`; the guest says in `job_status.json` which it
//! mounted.

use serde::{Deserialize, Serialize};

/// Most caches one job may name.
pub const MAX_CACHES: usize = 8;
/// Longest cache name.
pub const MAX_NAME: usize = 32;
/// Where the guest mounts them.
pub const MOUNT_DIR: &str = "/cache";

/// Whether `name` may name a cache: 1 to 32 of `a-z 0-9 . _ -`, starting
/// with a letter or digit (it becomes a directory on the host and in the guest).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a cache name (1 to {MAX_NAME} of a-z 0-9 . _ -, starting with a letter or digit)",
            crate::sanitize(name.as_bytes())
        ))
    }
}

/// Checks a job's list of caches: each name, no name twice, at most [`MAX_CACHES`].
pub fn check_names(names: &[String]) -> Result<(), String> {
    if names.len() > MAX_CACHES {
        return Err(format!("{} caches named; at most {MAX_CACHES} are taken", names.len()));
    }
    for (i, name) in names.iter().enumerate() {
        check_name(name)?;
        if names[..i].contains(name) {
            return Err(format!("cache {name:?} is named twice"));
        }
    }
    Ok(())
}

/// Longest owner name.
pub const MAX_OWNER: usize = 40;

/// Whether `owner` may own caches on a host: 1 to 40 of `a-z 0-9 _ -`,
/// starting with a letter (it becomes a directory on the host). The server
/// names an account `a<id>` (ids are never reused); a local queue's owner
/// is `local`.
pub fn check_owner(owner: &str) -> Result<(), String> {
    let ok = !owner.is_empty()
        && owner.len() <= MAX_OWNER
        && owner.as_bytes()[0].is_ascii_lowercase()
        && owner.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a cache owner (1 to {MAX_OWNER} of a-z 0-9 _ -, starting with a letter)",
            crate::sanitize(owner.as_bytes())
        ))
    }
}

/// The cache owner the server names an account by: `a<id>`.
pub fn account_owner(account_id: i64) -> String {
    format!("a{account_id}")
}

/// Each owner's cleared caches: owner -> cache name -> generation. A
/// cache is cleared by raising its generation; a host keeps a cache's
/// generation beside it and starts one whose generation is not the
/// current one again, empty. A name that is not listed is at generation 0.
pub type Generations = std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>;

/// The generation of `owner`'s cache `name` in `generations`.
pub fn generation(generations: &Generations, owner: &str, name: &str) -> u64 {
    generations.get(owner).and_then(|m| m.get(name)).copied().unwrap_or(0)
}

/// One cache a job named, as the host gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given {
    pub name: String,
    /// The kept version the job starts from (0: new and empty); `None`
    /// when this host gives no caches (the guest makes an empty directory).
    pub version: Option<u64>,
}

impl Given {
    /// The serial of the `index`-th disk: the `index`-th given entry that
    /// has a version (virtio allows 20 bytes).
    pub fn serial(index: usize) -> String {
        format!("construir-cache{index}")
    }
}

/// `ccache:3,cargo:off` for `construir.caches=`.
pub fn to_cmdline(given: &[Given]) -> String {
    given
        .iter()
        .map(|g| format!("{}:{}", g.name, g.version.map_or_else(|| "off".to_owned(), |v| v.to_string())))
        .collect::<Vec<_>>()
        .join(",")
}

/// The list `to_cmdline` wrote; entries that are not well formed are left
/// out, each with a warning.
pub fn from_cmdline(value: &str) -> (Vec<Given>, Vec<String>) {
    let (mut given, mut warnings) = (Vec::new(), Vec::new());
    for item in value.split(',').filter(|s| !s.is_empty()) {
        let parsed = item.split_once(':').and_then(|(name, version)| {
            check_name(name).ok()?;
            let version = if version == "off" { None } else { Some(version.parse().ok()?) };
            Some(Given { name: name.to_owned(), version })
        });
        match parsed {
            Some(g) if given.len() < MAX_CACHES && !given.iter().any(|o: &Given| o.name == g.name) => given.push(g),
            _ => warnings
                .push(format!("ignoring cache {:?} on the kernel command line", crate::sanitize(item.as_bytes()))),
        }
    }
    (given, warnings)
}

/// What became of one cache in the VM, for `job_status.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStatus {
    pub name: String,
    /// The version the job started from; none when the host gives no caches.
    pub version: Option<u64>,
    /// Whether it was mounted at `/cache/<name>`; when not, the job had an
    /// empty directory there, and nothing it wrote is kept.
    pub mounted: bool,
    /// Why it was not mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The environment the guest sets for a cache of this name, so that the
/// tool of that name uses it: (variable, path under `/cache/<name>`, "" for
/// the mount itself). Other names get `CONSTRUIR_CACHE_<NAME>` only.
pub fn environment(name: &str) -> &'static [(&'static str, &'static str)] {
    match name {
        "ccache" => &[("CCACHE_DIR", "")],
        "sccache" => &[("SCCACHE_DIR", "")],
        "cargo" => &[("CARGO_HOME", "")],
        "pip" => &[("PIP_CACHE_DIR", "")],
        "go" => &[("GOCACHE", "build"), ("GOMODCACHE", "mod")],
        "npm" => &[("npm_config_cache", "")],
        "gradle" => &[("GRADLE_USER_HOME", "")],
        _ => &[],
    }
}

/// Every variable the job gets for its caches: the tools' own (above), and
/// `CONSTRUIR_CACHE_<NAME>` (upper case, `.` and `-` as `_`) for each.
pub fn variables(names: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in names {
        let dir = format!("{MOUNT_DIR}/{name}");
        let own: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        out.push((format!("CONSTRUIR_CACHE_{own}"), dir.clone()));
        for (var, sub) in environment(name) {
            let value = if sub.is_empty() { dir.clone() } else { format!("{dir}/{sub}") };
            out.push(((*var).to_owned(), value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["ccache", "cargo", "a", "my-cache.v2", "x_1", &"a".repeat(MAX_NAME)] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in ["", "Ccache", "-x", ".x", "a/b", "..", "a b", "ä", &"a".repeat(MAX_NAME + 1), "x\u{1b}"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_names(&["a".into(), "b".into(), "a".into()]).is_err_and(|e| e.contains("named twice")));
        let many: Vec<String> = (0..=MAX_CACHES).map(|i| format!("c{i}")).collect();
        assert!(check_names(&many).is_err_and(|e| e.contains("at most 8")));
        assert_eq!(check_names(&many[..MAX_CACHES]), Ok(()));
    }

    #[test]
    fn the_command_line_round_trips_and_drops_what_is_not_well_formed() {
        let given = vec![
            Given { name: "ccache".into(), version: Some(3) },
            Given { name: "cargo".into(), version: Some(0) },
            Given { name: "pip".into(), version: None },
        ];
        assert_eq!(to_cmdline(&given), "ccache:3,cargo:0,pip:off");
        assert_eq!(from_cmdline(&to_cmdline(&given)), (given, vec![]));
        let (got, warnings) = from_cmdline("ok:1,Bad:1,x:y,noversion,ok:2,../x:1");
        assert_eq!(got, [Given { name: "ok".into(), version: Some(1) }]);
        assert_eq!(warnings.len(), 5, "{warnings:?}");
        assert_eq!(Given::serial(7), "construir-cache7");
        assert!(Given::serial(MAX_CACHES - 1).len() <= 20, "virtio-blk serials hold 20 bytes");
    }

    #[test]
    fn each_cache_gets_its_variables() {
        let vars = variables(&["ccache".into(), "go".into(), "my-stuff".into()]);
        let get = |k: &str| vars.iter().find(|(v, _)| v == k).map(|(_, x)| x.as_str());
        assert_eq!(get("CCACHE_DIR"), Some("/cache/ccache"));
        assert_eq!(get("CONSTRUIR_CACHE_CCACHE"), Some("/cache/ccache"));
        assert_eq!(get("GOCACHE"), Some("/cache/go/build"));
        assert_eq!(get("GOMODCACHE"), Some("/cache/go/mod"));
        assert_eq!(get("CONSTRUIR_CACHE_MY_STUFF"), Some("/cache/my-stuff"));
        assert_eq!(vars.len(), 6);
    }
}
