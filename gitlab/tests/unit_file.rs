//! The systemd unit in config/gitlab/, checked by systemd's own tools.
//! (Starting it needs systemd as PID 1, which the test machines do not have.)

use std::fs;
use std::path::Path;
use std::process::Command;

fn unit_here(dir: &Path) -> std::path::PathBuf {
    let text =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/gitlab/construir-gitlab.service"))
            .expect("config/gitlab/construir-gitlab.service");
    let path = dir.join("construir-gitlab.service");
    fs::write(&path, text.replace("/usr/local/bin/construir-gitlab", env!("CARGO_BIN_EXE_construir-gitlab")))
        .expect("write");
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

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ok, out) = analyze(&["verify", "--man=no"], &unit_here(tmp.path()));
    assert!(ok && out.trim().is_empty(), "{out}");
}

/// It needs no privilege, and the sandbox says so.
#[test]
fn the_runner_runs_unprivileged_in_a_tight_sandbox() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, out) = analyze(&["security", "--offline=yes"], &unit_here(tmp.path()));
    for held in [
        "User=/DynamicUser=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateDevices=",
        "NoNewPrivileges=",
        "MemoryDenyWriteExecute=",
        "RestrictNamespaces=~user",
        "RestrictAddressFamilies=~AF_PACKET",
    ] {
        assert!(out.lines().any(|l| l.starts_with(&format!("✓ {held}"))), "{held} is not in force:\n{out}");
    }
    let exposure: f64 = out
        .lines()
        .find_map(|l| l.split("Overall exposure level for construir-gitlab.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    assert!(exposure <= 2.0, "exposure {exposure} (it was 1.3 when the unit was written):\n{out}");
}
