//! Where Slurm may place a job: the `sbatch` options that follow from the
//! server's settings and from the job's image. A site whose nodes differ
//! names, per guest architecture, the node features its jobs need
//! (`--slurm-constraint arm64=FEATURES`), which Slurm gets as
//! `--constraint`: an arm64 job then goes only to nodes that have them.

use std::collections::BTreeMap;
use std::path::Path;

use jobfile::arch::Arch;
use jobfile::layout::AttemptDir;

use super::Settings;

/// The node features each architecture's jobs need, as Slurm's `--constraint` takes them.
pub type Constraints = BTreeMap<Arch, String>;

/// One `--slurm-constraint ARCH=FEATURES`: Debian's or the kernel's name
/// for the architecture, then a Slurm feature expression (`aarch64`,
/// `arm64&bigmem`, `[rack1|rack2]`).
pub fn parse_constraint(text: &str) -> Result<(Arch, String), String> {
    let (arch, features) =
        text.split_once('=').ok_or_else(|| format!("{text:?} is not ARCH=FEATURES (e.g. arm64=aarch64)"))?;
    let arch: Arch = arch.trim().parse().map_err(|e: jobfile::arch::UnknownArch| e.to_string())?;
    let features = features.trim();
    if features.is_empty() {
        return Err(format!("{text:?} names no feature for {arch}"));
    }
    if let Some(c) = features.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{text:?}: a Slurm feature expression has no {c:?}"));
    }
    Ok((arch, features.to_owned()))
}

/// The constraints by architecture; one architecture given twice is refused.
pub fn constraints(given: &[(Arch, String)]) -> Result<Constraints, String> {
    let mut out = Constraints::new();
    for (arch, features) in given {
        if let Some(before) = out.insert(*arch, features.clone()) {
            return Err(format!("--slurm-constraint names {arch} twice ({before} and {features})"));
        }
    }
    Ok(out)
}

/// What every attempt of a job on an image of `arch` asks Slurm for: its
/// resources, where it is charged, and the nodes it may run on.
fn resources(settings: &Settings, arch: Arch) -> Vec<String> {
    let mut args = vec![
        format!("--cpus-per-task={}", settings.cpus),
        format!("--mem={}M", settings.slurm_memory_mib()),
        format!("--time={}", settings.slurm_minutes()),
    ];
    args.extend(settings.partition.iter().map(|p| format!("--partition={p}")));
    args.extend(settings.account.iter().map(|a| format!("--account={a}")));
    args.extend(settings.constraints.get(&arch).map(|f| format!("--constraint={f}")));
    args
}

/// `sbatch`'s arguments for one attempt of a job on an image of `arch`.
pub fn sbatch_args(settings: &Settings, job_name: &str, dir: &Path, arch: Arch) -> Vec<String> {
    let places = AttemptDir::at(dir);
    let mut args = vec![
        "--parsable".to_owned(),
        "--no-requeue".into(),
        format!("--job-name={job_name}"),
        format!("--chdir={}", dir.display()),
        format!("--output={}", places.slurm_out().display()),
    ];
    args.extend(resources(settings, arch));
    args.push(places.script().to_string_lossy().into_owned());
    args
}

/// Asks Slurm, without submitting anything (`sbatch --test-only`), whether
/// a job of each constrained architecture could be placed: a feature no
/// node has, or no node with it big enough, is refused at start. Found
/// later, at each job's `sbatch`, it would keep every job waiting.
pub async fn check(settings: &Settings) -> Result<(), String> {
    for (arch, features) in &settings.constraints {
        let mut args = vec!["--test-only".to_owned(), "--job-name=construir.check".into()];
        args.extend(resources(settings, *arch));
        args.push("--wrap=true".into());
        super::slurm(settings, "sbatch", &args).await.map_err(|why| {
            format!("Slurm cannot place a job of --slurm-constraint {arch}={features} (with these resources): {why}")
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_are_read_per_architecture_and_reach_sbatch_only_for_theirs() {
        assert_eq!(parse_constraint("arm64=aarch64"), Ok((Arch::Arm64, "aarch64".into())));
        assert_eq!(parse_constraint("aarch64 = arm64&bigmem"), Ok((Arch::Arm64, "arm64&bigmem".into())));
        assert_eq!(parse_constraint("x86_64=[rack1|rack2]"), Ok((Arch::Amd64, "[rack1|rack2]".into())));
        assert!(parse_constraint("arm64").is_err_and(|e| e.contains("ARCH=FEATURES")));
        assert!(parse_constraint("riscv64=rv").is_err_and(|e| e.contains("unknown architecture")));
        assert!(parse_constraint("arm64=").is_err_and(|e| e.contains("names no feature")));
        assert!(parse_constraint("arm64=a b").is_err_and(|e| e.contains("' '")));
        let given = [(Arch::Arm64, "aarch64".to_owned()), (Arch::Arm64, "big".to_owned())];
        assert!(constraints(&given).is_err_and(|e| e.contains("arm64 twice")));

        let mut settings = super::super::tests::settings(Path::new("/shared"));
        settings.partition = Some("build".into());
        settings.constraints = constraints(&[(Arch::Arm64, "aarch64&kvm".to_owned())]).expect("one each");
        let dir = Path::new("/shared/runs/0123.1");
        let arm = sbatch_args(&settings, "construir.0123.1", dir, Arch::Arm64);
        assert_eq!(
            arm,
            [
                "--parsable",
                "--no-requeue",
                "--job-name=construir.0123.1",
                "--chdir=/shared/runs/0123.1",
                "--output=/shared/runs/0123.1/slurm.out",
                "--cpus-per-task=1",
                "--mem=1536M",
                "--time=4",
                "--partition=build",
                "--constraint=aarch64&kvm",
                "/shared/runs/0123.1/run.sh",
            ]
        );
        // An architecture with none named goes wherever Slurm places it, as before.
        let amd = sbatch_args(&settings, "construir.0123.1", dir, Arch::Amd64);
        assert!(!amd.iter().any(|a| a.starts_with("--constraint")), "{amd:?}");
        assert_eq!(amd.len(), arm.len() - 1);
    }
}
