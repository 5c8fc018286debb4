//! arm64 guests on this x86_64 machine: images made by `image-builder
//! --arch arm64`, booted by `qemu-system-aarch64 -M virt` under TCG in the
//! same jail as every VM. Few tests, each covering much: an emulated
//! aarch64 guest is several times slower than an x86 one.

use std::fs;
use std::path::Path;
use std::process::Command;

use construir_e2e::server::{add_account, client, job_dir, RemoteHost, Server};
use construir_e2e::{arm64_debian_images, arm64_mini_images, bin, job_log, job_status, sh, signed_statement, Queue};

/// The machine the statement says the job's VM was.
fn machine(statement: &serde_json::Value) -> &serde_json::Value {
    &statement["predicate"]["buildDefinition"]["internalParameters"]
}

/// The mini image: its job runs on aarch64, the image says arm64 where it
/// is listed and verified, the provenance names the architecture and the
/// QEMU that ran it, and a host with no arm64 QEMU refuses the job, saying
/// what to install.
#[test]
fn the_arm64_mini_image_runs_its_job_on_aarch64_and_says_so_everywhere() {
    let images = arm64_mini_images();
    let q = Queue::new();
    q.add_job("arch_i7.tar.xz", "#!/bin/sh\nset -e\nuname -m\nmkdir -p out\nuname -m > out/machine\n", "1M", &[]);
    let run = q.run_with_images(images, &["--timeout", "2m"]);
    assert!(run.success, "{}", run.log);
    assert!(run.log.contains("arm64 with qemu-system-aarch64 7.2 (tcg)"), "{}", run.log);
    let result = q.done("arch_d7.tar.xz");
    assert_eq!(job_status(&result)["result"], "ok", "{}", run.log);
    assert_eq!(String::from_utf8_lossy(&job_log(&result)), "aarch64\n");
    let statement = signed_statement(&q, &q.done.join("arch_d7.intoto.jsonl"));
    let m = machine(&statement);
    assert_eq!(m["architecture"], "arm64", "{m}");
    assert_eq!(m["emulator"], "qemu-system-aarch64", "{m}");
    assert_eq!(m["accelerator"], "tcg", "a foreign guest is always emulated: {m}");
    assert_eq!(m["qemu"], "7.2", "{m}");

    // image-builder list shows the architecture; verify boots it and checks it.
    let out = Command::new(bin("image-builder")).arg("list").arg(images).output().expect("list");
    let listing = String::from_utf8_lossy(&out.stdout);
    let row = listing.lines().find(|l| l.starts_with("i7 ")).unwrap_or_default();
    assert!(row.split_whitespace().nth(2) == Some("arm64") && row.ends_with(" ok"), "{listing}");
    let out = Command::new(bin("image-builder")).arg("verify").arg(images.join("i7")).output().expect("verify");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("construir-verify: machine aarch64"), "{said}");

    // doctor names the arm64 QEMU the installed image needs, and fails without it.
    let doctor = |qemu: &str| {
        let out = Command::new(bin("construir-host"))
            .arg("doctor")
            .arg(&q.queue)
            .args(["--accel", "tcg", "--qemu-arm64", qemu, "--images"])
            .arg(images)
            .output()
            .expect("doctor");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, report) = doctor("qemu-system-aarch64");
    let line = report.lines().find(|l| l.contains("arm64 ")).unwrap_or_default().to_owned();
    assert!(ok && line.starts_with("ok") && line.contains("QEMU 7.2: arm64 guests run under TCG (i7)"), "{report}");
    let (ok, report) = doctor("/nonexistent/qemu-system-aarch64");
    assert!(!ok && report.contains("FAIL  arm64") && report.contains("apt-get install qemu-system-arm"), "{report}");

    // A host without an arm64 QEMU refuses the job before any VM, saying what to install.
    q.add_job("nomu_i7.tar.xz", "#!/bin/sh\nuname -m\n", "1M", &[]);
    let run = q.run_with_images(images, &["--timeout", "2m", "--qemu-arm64", "/nonexistent/qemu-system-aarch64"]);
    assert!(run.success, "{}", run.log);
    let reason = q.reason("nomu_i7.tar.xz");
    assert!(
        reason.contains("its image is arm64 and this host has no QEMU for arm64 guests (install qemu-system-arm"),
        "{reason}"
    );
    assert!(!run.log.contains("booting image i7"), "{}", run.log);
}

/// zlib's example program, as a job compiles it: its own source, linked
/// with the declared zlib1g-dev, run on what it built; the binary comes back.
const ZPIPE: &str = r#"#include <stdio.h>
#include <string.h>
#include <zlib.h>
int main(void) {
    const char *text = "construir builds for arm64, construir builds for arm64, construir builds for arm64";
    unsigned char packed[256];
    uLongf size = sizeof packed;
    if (compress(packed, &size, (const unsigned char *)text, strlen(text)) != Z_OK) return 1;
    printf("zlib %s: %zu bytes into %lu\n", zlibVersion(), strlen(text), (unsigned long)size);
    return 0;
}
"#;

const BUILD: &str = "#!/bin/sh\nset -e\nmkdir -p out\ngcc -O2 -o out/zpipe zpipe.c -lz\n./out/zpipe\n";

/// `file` of the built program in a result, unpacked under `into`.
fn file_of_built_program(result: &Path, into: &Path) -> String {
    fs::create_dir_all(into).expect("mkdir");
    sh(&format!("tar -xJf '{}' out/zpipe", result.display()), into);
    let out = Command::new("file").arg(into.join("out/zpipe")).output().expect("file");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The arm64 Debian image builds a C program with a declared package
/// (zlib1g-dev, resolved for arm64 and installed into an arm64 layer); the
/// program is an ARM aarch64 one. Then the same job through the server and
/// a remote build host, as a verified rebuild: both runs on the arm64
/// image, compared, reproducible. The host and the server show arm64.
#[test]
fn a_c_program_with_a_declared_package_builds_on_arm64_debian_and_is_verified_through_the_farm() {
    let images = arm64_debian_images();
    let q = Queue::new();
    let layers = q.root.path().join("shared-cache");
    let src = job_dir(q.root.path(), "zpipe", BUILD);
    fs::write(src.join("zpipe.c"), ZPIPE).expect("source");
    let out = Command::new(bin("construir-host"))
        .args(["job", "pack"])
        .arg(&src)
        .args(["--image", "107", "--size", "8M", "--packages", "zlib1g-dev", "--force", "--out"])
        .arg(q.root.path())
        .output()
        .expect("job pack");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    sh("touch -d '-1 min' zpipe_i107.tar.xz", q.root.path());
    fs::rename(q.root.path().join("zpipe_i107.tar.xz"), q.queue.join("zpipe_i107.tar.xz")).expect("queue");
    let cache = layers.to_string_lossy().into_owned();
    let run = q.run_with_images(images, &["--timeout", "20m", "--package-cache", &cache]);
    assert!(run.success, "{}", run.log);
    let result = q.done("zpipe_d107.tar.xz");
    let status = job_status(&result);
    assert_eq!(status["result"], "ok", "{status}\n{}", run.log);
    let packages: Vec<String> = status["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| format!("{}:{}", p["name"].as_str().unwrap_or(""), p["architecture"].as_str().unwrap_or("")))
        .collect();
    assert!(packages.contains(&"zlib1g-dev:arm64".to_owned()), "resolved for the image's architecture: {packages:?}");
    let output = String::from_utf8_lossy(&job_log(&result)).into_owned();
    assert!(output.starts_with("zlib 1.2.13: 82 bytes into "), "{output}");
    let file = file_of_built_program(&result, &q.root.path().join("local"));
    assert!(file.contains("ELF 64-bit LSB") && file.contains("ARM aarch64"), "{file}");

    // The farm: the server, a remote host with the image, a verified rebuild on it.
    let db = q.root.path().join("server.db");
    let token = add_account(&db, "alice");
    let s = Server::start_with_images(&q, &db, images, &[]);
    let host =
        RemoteHost::start(&s, &db, q.root.path(), "armhost", images, &["--timeout", "20m", "--package-cache", &cache]);
    let dir = src.to_string_lossy().into_owned();
    let args = ["submit", &dir, "--image", "107", "--size", "8M", "--packages", "zlib1g-dev", "--verify-on", "2"];
    let (code, out, err) = client(&s, &token, q.root.path(), &[&args[..], &["--wait"]].concat());
    assert_eq!(code, 0, "{err}\nhost:\n{}\nserver:\n{}", host.log(), s.log());
    assert!(err.contains("reproducible: all ") && err.contains(" files the same both runs on armhost"), "{err}");
    let id = out.lines().next().unwrap_or_default().trim().to_owned();
    let fetched = q.root.path().join("farm.tar.xz");
    let (code, _, err) = client(&s, &token, q.root.path(), &["fetch", &id, "--out", &fetched.to_string_lossy()]);
    assert_eq!(code, 0, "{err}");
    let file = file_of_built_program(&fetched, &q.root.path().join("farm"));
    assert!(file.contains("ARM aarch64"), "{file}");
    assert_eq!(String::from_utf8_lossy(&job_log(&fetched)), output, "the same program, the same output");
    let (code, hosts, err) = client(&s, &token, q.root.path(), &["hosts"]);
    assert_eq!(code, 0, "{err}");
    let row = hosts.lines().find(|l| l.starts_with("armhost ")).unwrap_or_default();
    assert!(row.contains(" i107 ") && row.contains(" arm64 "), "{hosts}");
}
