//! The systemd unit in config/host/, checked by systemd's own tools.
//! (Starting it needs systemd as PID 1, which the test machines do not
//! have; docs/operator-guide.md says what that leaves unproven.)

use std::fs;
use std::path::Path;
use std::process::Command;

fn unit_text() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/host/construir-host.service"))
        .expect("config/host/construir-host.service")
}

/// The unit with ExecStart pointing at this build, as `verify` checks that the binary exists.
fn unit_here(dir: &Path) -> std::path::PathBuf {
    let text = unit_text().replace("/usr/local/bin/construir-host", env!("CARGO_BIN_EXE_construir-host"));
    let path = dir.join("construir-host.service");
    fs::write(&path, text).expect("write");
    path
}

fn analyze(args: &[&str], unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze (package systemd; scripts/test installs it)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn setting(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ok, out) = analyze(&["verify", "--man=no"], &unit_here(tmp.path()));
    assert!(ok && out.trim().is_empty(), "{out}");
}

#[test]
fn the_sandbox_holds_what_the_jail_allows_and_stopping_leaves_room_to_requeue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, out) = analyze(&["security", "--offline=yes"], &unit_here(tmp.path()));
    for held in [
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "NoNewPrivileges=",
        "ProtectKernelModules=",
        "ProtectKernelLogs=",
        "ProtectClock=",
        "ProtectHostname=",
        "RestrictRealtime=",
        "RestrictSUIDSGID=",
        "LockPersonality=",
        "SystemCallArchitectures=",
        "RestrictNamespaces=~user",
        "RestrictNamespaces=~cgroup",
        "RestrictAddressFamilies=~AF_(INET|INET6)",
        "RestrictAddressFamilies=~AF_NETLINK",
        "RestrictAddressFamilies=~AF_PACKET",
    ] {
        assert!(out.lines().any(|l| l.starts_with(&format!("✓ {held}"))), "{held} is not in force:\n{out}");
    }
    let exposure: f64 = out
        .lines()
        .find_map(|l| l.split("Overall exposure level for construir-host.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    assert!(exposure <= 6.5, "exposure {exposure} (it was 6.4 when the unit was written):\n{out}");

    let text = unit_text();
    assert_eq!(setting(&text, "KillMode").as_deref(), Some("mixed"), "QEMU must not get the SIGTERM");
    assert_eq!(setting(&text, "Delegate").as_deref(), Some("yes"));
    // systemd's SIGKILL must come well after the host's own stop bound.
    let shown = Command::new(env!("CARGO_BIN_EXE_construir-host"))
        .args(["run", "q", "--config", "/dev/null", "--show-config"])
        .output()
        .expect("show-config");
    let shown = String::from_utf8(shown.stdout).expect("utf8");
    let stop = shown.lines().find_map(|l| l.strip_prefix("stop-timeout = ")).expect("stop-timeout").trim_matches('"');
    let stop = jobfile::units::parse_duration(stop).expect("duration").as_secs();
    let systemd: u64 =
        setting(&text, "TimeoutStopSec").and_then(|t| t.parse().ok()).expect("TimeoutStopSec in seconds");
    assert!(systemd >= stop + 30, "TimeoutStopSec={systemd} leaves no room after stop-timeout {stop} s");
}
