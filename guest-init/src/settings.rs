//! Settings from the kernel command line (`construir.*=`), with defaults.

use std::path::PathBuf;
use std::time::Duration;

/// What the host asked for on the kernel command line.
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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            job_device: PathBuf::from("/dev/vdb"),
            timeout: None,
            deadline: None,
            xz_preset: jobfile::xz::DEFAULT_PRESET,
            threads: 0,
            name: None,
            image: None,
            device_wait: Duration::from_secs(30),
            console_max: 4 << 20,
        }
    }
}

impl Settings {
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
                "name" if jobfile::name::check_name(value).is_ok() => {
                    s.name = Some(value.to_owned());
                    true
                }
                "image" if jobfile::name::check_image(value).is_ok() => {
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
             construir.threads=2 construir.name=hello construir.image=100 construir.wait=5 construir.console=1000",
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
            }
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn bad_values_keep_defaults_and_warn() {
        let (s, warnings) = Settings::from_cmdline(
            "construir.xz=12 construir.timeout=soon construir.job=vdb construir.name=-x construir.bogus=1",
        );
        assert_eq!(s, Settings::default());
        assert_eq!(warnings.len(), 5, "{warnings:?}");
    }
}
