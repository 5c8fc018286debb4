//! What a CI job can upload: each regular file of the checkout as the
//! result left it (paths as in the repository, which is what `artifacts:
//! paths` name), and the result's signed provenance beside them.

use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};

use gitlab_runner::UploadableFile;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

/// The provenance's name among the artifacts: list it in `artifacts: paths`.
pub const PROVENANCE: &str = "construir-provenance.intoto.jsonl";

/// One file on disk, offered under the path GitLab matches.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub path: String,
    pub file: PathBuf,
}

#[async_trait::async_trait]
impl UploadableFile for Artifact {
    type Data<'a> = Compat<tokio::fs::File>;

    fn get_path(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.path)
    }

    async fn get_data(&self) -> Result<Self::Data<'_>, ()> {
        tokio::fs::File::open(&self.file).await.map(|f| f.compat()).map_err(|e| {
            eprintln!("construir-gitlab: cannot open {}: {e}", self.file.display());
        })
    }
}

/// Every regular file under `checkout` (links and the like are not
/// followed), then the provenance; a path that is not UTF-8 is left out.
pub fn offered(checkout: &Path, provenance: &Path) -> Vec<Artifact> {
    let mut out = Vec::new();
    walk(checkout, "", &mut out);
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.push(Artifact { path: PROVENANCE.to_owned(), file: provenance.to_owned() });
    out
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<Artifact>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let (Ok(kind), Ok(name)) = (e.file_type(), e.file_name().into_string()) else { continue };
        let path = format!("{prefix}{name}");
        if kind.is_dir() {
            if !(prefix.is_empty() && name == ".git") {
                walk(&e.path(), &format!("{path}/"), out);
            }
        } else if kind.is_file() {
            out.push(Artifact { path, file: e.path() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_offered_by_their_repository_path_and_the_provenance_last() {
        let d = tempfile::tempdir().expect("tempdir");
        let src = d.path().join("src");
        fs::create_dir_all(src.join("out/deep")).expect("mkdir");
        fs::create_dir_all(src.join(".git/objects")).expect("mkdir");
        fs::write(src.join("out/deep/a.bin"), b"a").expect("write");
        fs::write(src.join("README"), b"r").expect("write");
        fs::write(src.join(".git/objects/x"), b"x").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", src.join("out/link")).expect("symlink");
        let offered = offered(&src, &d.path().join("p.jsonl"));
        let paths: Vec<&str> = offered.iter().map(|a| a.path.as_str()).collect();
        assert_eq!(paths, ["README", "out/deep/a.bin", PROVENANCE]);
    }
}
