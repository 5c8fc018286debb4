//! The kernel command line between host and guest: the `construir.*=`
//! words the host writes (`to_cmdline`) and `construir-init` reads
//! (`from_cmdline`), one type for both, with the guest's defaults.

use std::path::PathBuf;
use std::time::Duration;

/// What the host asks of the guest on the kernel command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `construir.job=`: the job disk.
    pub job_device: PathBuf,
    /// `construir.timeout=` (seconds): how long the job script may run.
    pub timeout: Option<Duration>,
    /// `construir.deadline=` (seconds from boot): PID 1's own watchdog powers
    /// the VM off then, whatever is stuck (the job timeout plus a margin).
    pub deadline: Option<Duration>,
    /// `construir.xz=`: compression preset for the result.
    pub xz_preset: u32,
    /// `construir.threads=`: compression threads (0: one per CPU).
    pub threads: u32,
    /// `construir.name=` and `construir.image=`: for the environment and the status.
    pub name: Option<String>,
    pub image: Option<String>,
    /// `construir.wait=` (seconds): how long to wait for the job disk to appear.
    pub device_wait: Duration,
    /// `construir.console=` (bytes): how much job output is mirrored to the console.
    pub console_max: u64,
    /// `construir.packages=`: build a layer: install the packages on this
    /// disk into the root, write the status onto the job disk, run no job.
    pub packages: Option<PathBuf>,
    /// `construir.layer=`: the layer (a 64-hex digest) the job boots from.
    pub layer: Option<String>,
    /// `construir.declared=1`: the host read the job's `construir.toml` and
    /// installed what it declares (so the guest need not refuse the job).
    pub declared: bool,
    /// `construir.caches=ccache:3,pip:off`: the build caches the job named,
    /// in order, each with the version it is given (`crate::caches`).
    pub caches: Vec<crate::caches::Given>,
    /// `construir.epoch=` (Unix seconds): `SOURCE_DATE_EPOCH` for the job,
    /// the same in both runs of a verified rebuild (`crate::rebuild`).
    pub epoch: Option<u64>,
    /// `construir.stages=resolve:1.2,fetch:0.3`: the host's stages before
    /// the VM, for the status (`crate::stages`).
    pub stages: Vec<crate::stages::StageTime>,
    /// `construir.debug=1`: when the job does not end ok, keep the VM up
    /// after its result is packed, with a shell on the session port
    /// (`crate::debug`); the host bounds how long.
    pub debug: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            job_device: PathBuf::from("/dev/vdb"),
            timeout: None,
            deadline: None,
            xz_preset: crate::xz::DEFAULT_PRESET,
            threads: 0,
            name: None,
            image: None,
            device_wait: Duration::from_secs(30),
            console_max: 4 << 20,
            packages: None,
            layer: None,
            declared: false,
            caches: Vec::new(),
            epoch: None,
            stages: Vec::new(),
            debug: false,
        }
    }
}

impl Settings {
    /// The `construir.*` words, space-separated: the job disk always, every
    /// other setting where it differs from the default (so an older guest
    /// is told nothing it does not need). Names and images are job names'
    /// parts, without spaces; `from_cmdline` gives back these settings.
    pub fn to_cmdline(&self) -> String {
        let d = Settings::default();
        let mut words = vec![format!("construir.job={}", self.job_device.display())];
        let secs = |t: Option<Duration>| t.map_or(0, |t| t.as_secs());
        if self.timeout.is_some() {
            words.push(format!("construir.timeout={}", secs(self.timeout)));
        }
        if self.deadline.is_some() {
            words.push(format!("construir.deadline={}", secs(self.deadline)));
        }
        if self.xz_preset != d.xz_preset {
            words.push(format!("construir.xz={}", self.xz_preset));
        }
        if self.threads != d.threads {
            words.push(format!("construir.threads={}", self.threads));
        }
        if let Some(name) = &self.name {
            words.push(format!("construir.name={name}"));
        }
        if let Some(image) = &self.image {
            words.push(format!("construir.image={image}"));
        }
        if self.device_wait != d.device_wait {
            words.push(format!("construir.wait={}", self.device_wait.as_secs()));
        }
        if self.console_max != d.console_max {
            words.push(format!("construir.console={}", self.console_max));
        }
        if let Some(packages) = &self.packages {
            words.push(format!("construir.packages={}", packages.display()));
        }
        if let Some(layer) = &self.layer {
            words.push(format!("construir.layer={layer}"));
        }
        if self.declared {
            words.push("construir.declared=1".to_owned());
        }
        if !self.caches.is_empty() {
            words.push(format!("construir.caches={}", crate::caches::to_cmdline(&self.caches)));
        }
        if let Some(epoch) = self.epoch {
            words.push(format!("construir.epoch={epoch}"));
        }
        if !self.stages.is_empty() {
            words.push(format!("construir.stages={}", crate::stages::to_cmdline(&self.stages)));
        }
        if self.debug {
            words.push("construir.debug=1".to_owned());
        }
        words.join(" ")
    }

    /// Reads the `construir.*` words of a kernel command line. Unknown or
    /// malformed ones are reported and otherwise ignored: PID 1 must go on.
    pub fn from_cmdline(cmdline: &str) -> (Settings, Vec<String>) {
        let mut s = Settings::default();
        let mut warnings = Vec::new();
        for word in cmdline.split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix("construir.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            let num = |v: &str| v.parse::<u64>().ok();
            let ok = match key {
                "job" if value.starts_with('/') => {
                    s.job_device = PathBuf::from(value);
                    true
                }
                "timeout" => num(value).map(|n| s.timeout = (n > 0).then(|| Duration::from_secs(n))).is_some(),
                "deadline" => num(value).map(|n| s.deadline = (n > 0).then(|| Duration::from_secs(n))).is_some(),
                "xz" => num(value).filter(|&n| n <= 9).map(|n| s.xz_preset = n as u32).is_some(),
                "threads" => num(value).filter(|&n| n <= 256).map(|n| s.threads = n as u32).is_some(),
                "wait" => num(value).map(|n| s.device_wait = Duration::from_secs(n)).is_some(),
                "console" => num(value).map(|n| s.console_max = n).is_some(),
                "packages" if value.starts_with('/') => {
                    s.packages = Some(PathBuf::from(value));
                    true
                }
                "layer" if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    s.layer = Some(value.to_owned());
                    true
                }
                "declared" => num(value).filter(|&n| n <= 1).map(|n| s.declared = n == 1).is_some(),
                "caches" => {
                    let (given, bad) = crate::caches::from_cmdline(value);
                    s.caches = given;
                    warnings.extend(bad);
                    true
                }
                "debug" => num(value).filter(|&n| n <= 1).map(|n| s.debug = n == 1).is_some(),
                "epoch" => num(value).map(|n| s.epoch = Some(n)).is_some(),
                "stages" => {
                    let (stages, bad) = crate::stages::from_cmdline(value);
                    s.stages = stages;
                    warnings.extend(bad);
                    true
                }
                "name" if crate::name::check_name(value).is_ok() => {
                    s.name = Some(value.to_owned());
                    true
                }
                "image" if crate::name::check_image(value).is_ok() => {
                    s.image = Some(value.to_owned());
                    true
                }
                _ => false,
            };
            if !ok {
                warnings.push(format!("ignoring kernel parameter {word:?}"));
            }
        }
        (s, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_setting_and_ignores_the_rest() {
        let (s, warnings) = Settings::from_cmdline(
            "console=ttyS0 quiet construir.job=/dev/vda construir.timeout=20 construir.deadline=95 construir.xz=3 \
             construir.threads=2 construir.name=hello construir.image=100 construir.wait=5 construir.console=1000 \
             construir.packages=/dev/vdc construir.layer=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef \
             construir.declared=1 construir.caches=ccache:2,pip:off construir.epoch=1700000000 \
             construir.stages=resolve:1.25,fetch:0 construir.debug=1",
        );
        assert_eq!(
            s,
            Settings {
                job_device: "/dev/vda".into(),
                timeout: Some(Duration::from_secs(20)),
                deadline: Some(Duration::from_secs(95)),
                xz_preset: 3,
                threads: 2,
                name: Some("hello".into()),
                image: Some("100".into()),
                device_wait: Duration::from_secs(5),
                console_max: 1000,
                packages: Some("/dev/vdc".into()),
                layer: Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into()),
                declared: true,
                caches: vec![
                    crate::caches::Given { name: "ccache".into(), version: Some(2) },
                    crate::caches::Given { name: "pip".into(), version: None },
                ],
                epoch: Some(1_700_000_000),
                stages: vec![
                    crate::stages::StageTime { stage: "resolve".into(), secs: 1.25 },
                    crate::stages::StageTime { stage: "fetch".into(), secs: 0.0 },
                ],
                debug: true,
            }
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn what_the_host_writes_the_guest_reads_back() {
        let every = Settings {
            job_device: "/dev/vdc".into(),
            timeout: Some(Duration::from_secs(3600)),
            deadline: Some(Duration::from_secs(3700)),
            xz_preset: 2,
            threads: 4,
            name: Some("hello-world.1".into()),
            image: Some("100".into()),
            device_wait: Duration::from_secs(7),
            console_max: 123_456,
            packages: Some("/dev/vdd".into()),
            layer: Some("f".repeat(64)),
            declared: true,
            caches: vec![crate::caches::Given { name: "cargo".into(), version: Some(0) }],
            epoch: Some(0),
            stages: vec![crate::stages::StageTime { stage: "layer".into(), secs: 31.5 }],
            debug: true,
        };
        let defaults = Settings::default();
        let some = Settings { timeout: Some(Duration::from_secs(5)), name: Some("x".into()), ..Settings::default() };
        for s in [every, defaults, some] {
            let line = format!("console=ttyS0 quiet {} panic=-1", s.to_cmdline());
            let (back, warnings) = Settings::from_cmdline(&line);
            assert_eq!(back, s, "{line}");
            assert!(warnings.is_empty(), "{line}: {warnings:?}");
        }
        assert_eq!(Settings::default().to_cmdline(), "construir.job=/dev/vdb", "defaults are not repeated");
    }

    #[test]
    fn bad_values_keep_defaults_and_warn() {
        let (s, warnings) = Settings::from_cmdline(
            "construir.xz=12 construir.timeout=soon construir.job=vdb construir.name=-x construir.bogus=1 \
             construir.packages=vdc construir.layer=../x construir.declared=yes construir.epoch=-1",
        );
        assert_eq!(s, Settings::default());
        assert_eq!(warnings.len(), 9, "{warnings:?}");
    }
}
