//! Prometheus metrics, written as a text file for node_exporter's textfile
//! collector (`--metrics-file`). A file rather than a listener: the host
//! runs as root and opens no socket at all, every machine that Prometheus
//! watches already runs node_exporter, and several hosts on one machine
//! each write their own file. The file is replaced atomically (written
//! beside it, then renamed), as the collector asks.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric a host keeps.
pub struct Metrics {
    registry: Registry,
    finished: IntCounterVec,
    refused: IntCounterVec,
    kills: IntCounterVec,
    queue_depth: IntGauge,
    running: IntGauge,
    boot: HistogramVec,
    run: HistogramVec,
}

/// Buckets from a quarter second (a KVM boot) to 12 hours (a long build).
const SECONDS: &[f64] =
    &[0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 43200.0];

impl Metrics {
    fn new(host_id: &str) -> Metrics {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("host", host_id);
        let finished = IntCounterVec::new(
            opts("construir_jobs_finished_total", "Jobs that reached done/ or failed/, by result and image."),
            &["result", "image"],
        )
        .expect("valid metric");
        let refused = IntCounterVec::new(
            opts("construir_jobs_refused_total", "Queue entries refused without running, by reason."),
            &["reason"],
        )
        .expect("valid metric");
        let kills =
            IntCounterVec::new(opts("construir_vm_kills_total", "VMs the host ended itself, by cause."), &["cause"])
                .expect("valid metric");
        let queue_depth = IntGauge::with_opts(opts("construir_queue_depth", "Job files waiting in the queue."))
            .expect("valid metric");
        let running =
            IntGauge::with_opts(opts("construir_vms_running", "VMs this host runs now.")).expect("valid metric");
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).const_label("host", host_id).buckets(SECONDS.to_vec()),
                &["image"],
            )
            .expect("valid metric")
        };
        let boot = histogram("construir_vm_boot_seconds", "From QEMU's start to construir-init's first line.");
        let run = histogram("construir_job_run_seconds", "How long job scripts ran, as their status says.");
        for c in [Box::new(finished.clone()) as Box<dyn prometheus::core::Collector>, Box::new(refused.clone())]
            .into_iter()
            .chain([
                Box::new(kills.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(queue_depth.clone()),
                Box::new(running.clone()),
                Box::new(boot.clone()),
                Box::new(run.clone()),
            ])
        {
            registry.register(c).expect("each metric is registered once");
        }
        Metrics { registry, finished, refused, kills, queue_depth, running, boot, run }
    }

    /// The metrics in Prometheus's text format.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Starts keeping metrics, labelled with this host's id.
pub fn init(host_id: &str) -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new(host_id))
}

fn with(f: impl FnOnce(&Metrics)) {
    if let Some(m) = METRICS.get() {
        f(m);
    }
}

/// A job ended in done/ or failed/ with `result` (the status's result, or
/// `no_result`, `unknown_image` and the like when there is none).
pub fn job_finished(result: &str, image: &str) {
    with(|m| m.finished.with_label_values(&[result, image]).inc());
}

/// A queue entry was refused; `reason` is one of a few fixed words.
pub fn refused(reason: &str) {
    with(|m| m.refused.with_label_values(&[reason]).inc());
}

/// The host ended a VM: `deadline`, `silence`, `no_boot` or `stop`.
pub fn vm_killed(cause: &str) {
    with(|m| m.kills.with_label_values(&[cause]).inc());
}

pub fn set_queue_depth(n: usize) {
    with(|m| m.queue_depth.set(n as i64));
}

pub fn set_running(n: usize) {
    with(|m| m.running.set(n as i64));
}

pub fn observe_boot(image: &str, took: Duration) {
    with(|m| m.boot.with_label_values(&[image]).observe(took.as_secs_f64()));
}

pub fn observe_run(image: &str, secs: f64) {
    with(|m| m.run.with_label_values(&[image]).observe(secs));
}

/// Writes the metrics to `path` atomically (a dot-file beside it, then a rename).
pub fn write_file(path: &Path) -> io::Result<()> {
    let Some(m) = METRICS.get() else { return Ok(()) };
    let name = path.file_name().ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp: PathBuf = path.with_file_name(tmp_name);
    fs::write(&tmp, m.encode())?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_each_metric_with_its_labels_and_values() {
        let m = Metrics::new("build1");
        m.finished.with_label_values(&["ok", "0"]).inc_by(2);
        m.refused.with_label_values(&["bad_name"]).inc();
        m.kills.with_label_values(&["deadline"]).inc();
        m.queue_depth.set(7);
        m.boot.with_label_values(&["0"]).observe(2.4);
        let text = m.encode();
        for line in [
            "# TYPE construir_jobs_finished_total counter",
            "construir_jobs_finished_total{host=\"build1\",image=\"0\",result=\"ok\"} 2",
            "construir_jobs_refused_total{host=\"build1\",reason=\"bad_name\"} 1",
            "construir_vm_kills_total{cause=\"deadline\",host=\"build1\"} 1",
            "construir_queue_depth{host=\"build1\"} 7",
            "construir_vms_running{host=\"build1\"} 0",
            "# TYPE construir_vm_boot_seconds histogram",
            "construir_vm_boot_seconds_bucket{host=\"build1\",image=\"0\",le=\"2\"} 0",
            "construir_vm_boot_seconds_bucket{host=\"build1\",image=\"0\",le=\"3\"} 1",
            "construir_vm_boot_seconds_count{host=\"build1\",image=\"0\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
