//! `construir-host job`: the submitter's tools (pack, inspect, unpack).

use anyhow::Result;
use jobfile::tools;
use jobfile::units::human_size;

use crate::cli::args::JobCommand;

pub(crate) fn run_job(cmd: JobCommand) -> Result<()> {
    match cmd {
        JobCommand::Pack(request) => {
            let packed = tools::pack(&request)?;
            for w in &packed.warnings {
                eprintln!("construir-host: warning: {w}");
            }
            eprintln!(
                "construir-host: packed {} into a {} job file",
                human_size(packed.compressed),
                human_size(packed.size)
            );
            println!("{}", packed.path.display());
        }
        JobCommand::Log { file, bounds } => tools::log(&file, bounds.limits("log"))?,
        JobCommand::Verify { file, provenance, keys } => {
            let keys = construir_provenance::keys_from_args(&keys)?;
            let provenance = provenance.unwrap_or_else(|| jobfile::layout::provenance_beside(&file));
            let log = jobfile::layout::log_beside(&file);
            let verified = construir_provenance::verify(&file, &provenance, &keys, log.as_deref())
                .map_err(|e| anyhow::anyhow!("{}: not verified: {}", file.display(), jobfile::error_chain(&e)))?;
            println!("{}: verified: {}", file.display(), verified.summary());
        }
        JobCommand::Status { file } => {
            let status = tools::status(&file)?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        JobCommand::List { file, bounds } => {
            tools::list(&file, &mut std::io::stdout().lock(), bounds.limits("list"))?;
        }
        JobCommand::Unpack { file, dir, bounds } => {
            let report = tools::unpack(&file, &dir, bounds.limits("unpack"))?;
            for s in &report.skipped {
                eprintln!("construir-host: skipped {}: {}", s.path, s.reason);
            }
            if report.skipped_total > report.skipped.len() as u64 {
                eprintln!(
                    "construir-host: ... and {} more skipped",
                    report.skipped_total - report.skipped.len() as u64
                );
            }
            eprintln!(
                "construir-host: unpacked {} files, {} directories, {} symlinks, {} hardlinks ({}) into {}",
                report.files,
                report.dirs,
                report.symlinks,
                report.hardlinks,
                human_size(report.bytes),
                dir.display()
            );
        }
    }
    Ok(())
}
