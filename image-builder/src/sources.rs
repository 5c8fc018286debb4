//! The Debian mirror this machine's apt already uses, read from its sources
//! (one-line `.list` files and deb822 `.sources` files), so no mirror is
//! ever written into construir itself.

use std::fs;
use std::path::Path;

/// One `deb` source: a mirror and the suites it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suites: Vec<String>,
}

/// Every `deb` source in `/etc/apt/sources.list` and `/etc/apt/sources.list.d/`.
pub fn system_sources(etc_apt: &Path) -> Vec<Source> {
    let mut found = Vec::new();
    if let Ok(text) = fs::read_to_string(etc_apt.join("sources.list")) {
        found.extend(parse_list(&text));
    }
    let mut files: Vec<_> = fs::read_dir(etc_apt.join("sources.list.d"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for path in files {
        let Ok(text) = fs::read_to_string(&path) else { continue };
        match path.extension().and_then(|e| e.to_str()) {
            Some("list") => found.extend(parse_list(&text)),
            Some("sources") => found.extend(parse_deb822(&text)),
            _ => {} // disabled or foreign files
        }
    }
    found
}

/// The mirror serving `suite`: a source listing that exact suite.
pub fn mirror_for(sources: &[Source], suite: &str) -> Option<String> {
    sources.iter().find(|s| s.suites.iter().any(|x| x == suite)).map(|s| s.uri.clone())
}

/// `deb [options] uri suite component...` lines.
fn parse_list(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let close = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
            rest.drain(..=close);
        }
        if let [uri, suite, ..] = rest.as_slice() {
            out.push(Source { uri: uri.to_string(), suites: vec![suite.to_string()] });
        }
    }
    out
}

/// deb822 stanzas: `Types:`, `URIs:`, `Suites:`, separated by blank lines.
fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|x| x == "deb"));
        if !enabled || !is_deb {
            continue;
        }
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else { continue };
        let suites: Vec<String> = suites.split_whitespace().map(str::to_owned).collect();
        for uri in uris.split_whitespace() {
            out.push(Source { uri: uri.to_owned(), suites: suites.clone() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mirror_for_a_suite_in_both_formats() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("sources.list.d")).expect("mkdir");
        fs::write(
            dir.path().join("sources.list"),
            "# comment\ndeb-src http://src.example/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://one.example/debian trixie main\n",
        )
        .expect("write");
        fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://two.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
             Types: deb\nURIs: http://two.example/debian-security\nSuites: bookworm-security\nComponents: main\n",
        )
        .expect("write");
        fs::write(
            dir.path().join("sources.list.d/other.sources.disabled"),
            "Types: deb\nURIs: http://nope\nSuites: sid\n",
        )
        .expect("write");
        let sources = system_sources(dir.path());
        assert_eq!(mirror_for(&sources, "bookworm").as_deref(), Some("http://two.example/debian"));
        assert_eq!(mirror_for(&sources, "trixie").as_deref(), Some("http://one.example/debian"));
        assert_eq!(mirror_for(&sources, "bookworm-security").as_deref(), Some("http://two.example/debian-security"));
        assert_eq!(mirror_for(&sources, "sid"), None);
    }
}
