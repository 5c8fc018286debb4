//! `image-builder mini` as an operator runs it, on this machine's kernel.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use jobfile::image::ImageManifest;

fn builder(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_image-builder")).args(args).output().expect("run image-builder")
}

fn cpio_listing(initrd: &Path) -> String {
    let out = Command::new("cpio").args(["-itv", "--quiet", "-F"]).arg(initrd).output().expect("cpio(1)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8")
}

#[test]
fn mini_builds_a_complete_image_with_a_manifest_that_matches_its_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("images/i0");
    let out = builder(&["mini", "--out", out_dir.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("image-builder: kernel ") && log.contains("image-builder: image ready at"), "{log}");

    let m = ImageManifest::load(&out_dir).expect("image.toml loads");
    assert_eq!((m.kind.as_str(), m.job_device.as_str(), m.root_disk.as_deref()), ("mini", "/dev/vda", None));
    assert!(Path::new("/lib/modules").join(&m.kernel_version).is_dir(), "kernel version {}", m.kernel_version);
    let names: Vec<&String> = m.sha256.keys().collect();
    // Debian's kernels have a PVH entry: the image holds the uncompressed ELF, which QEMU boots directly.
    assert_eq!(names, ["initrd.img", "vmlinux"]);
    assert_eq!(m.kernel, "vmlinux");
    assert!(fs::read(out_dir.join("vmlinux")).expect("kernel").starts_with(b"\x7fELF"));
    assert!(log.contains("kernel file vmlinux (uncompressed, booted through its PVH entry)"), "{log}");
    for (file, sum) in &m.sha256 {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(fs::read(out_dir.join(file)).expect("read"));
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&hex, sum, "{file}");
    }
    let mut left: Vec<String> = fs::read_dir(tmp.path().join("images"))
        .expect("ls")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["i0"], "nothing half-built is left beside the image");

    let listing = cpio_listing(&out_dir.join("initrd.img"));
    for want in [
        " init\n",
        " bin/busybox\n",
        " bin/sh -> /bin/busybox\n",
        " etc/construir/modules\n",
        " dev/console\n",
        "virtio_blk.ko\n",
    ] {
        assert!(listing.contains(want), "{want:?} missing from the initramfs:\n{listing}");
    }
    // The module list loads dependencies first: virtio_blk after virtio_ring.
    let extract = tmp.path().join("x");
    fs::create_dir(&extract).expect("mkdir");
    let status = Command::new("cpio")
        .args(["-id", "--quiet", "etc/construir/modules", "init"])
        .stdin(fs::File::open(out_dir.join("initrd.img")).expect("initrd"))
        .current_dir(&extract)
        .status()
        .expect("cpio");
    assert!(status.success());
    let modules = fs::read_to_string(extract.join("etc/construir/modules")).expect("module list");
    let order: Vec<&str> = modules.lines().map(|l| l.rsplit('/').next().unwrap_or(l)).collect();
    let pos = |m: &str| order.iter().position(|o| *o == m).unwrap_or_else(|| panic!("{m} not in {order:?}"));
    assert!(pos("virtio_ring.ko") < pos("virtio_blk.ko") && pos("virtio.ko") < pos("virtio_pci.ko"), "{order:?}");
    let file = Command::new("file").arg(extract.join("init")).output().expect("file(1)");
    assert!(
        String::from_utf8_lossy(&file.stdout).contains("statically linked"),
        "{}",
        String::from_utf8_lossy(&file.stdout)
    );

    // An existing image is not replaced without --force.
    let again = builder(&["mini", "--out", out_dir.to_str().expect("utf8")]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists (use --force"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let forced = builder(&["mini", "--out", out_dir.to_str().expect("utf8"), "--force"]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
}

#[test]
fn mini_refuses_a_dynamic_init_and_a_missing_kernel() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("i1");
    let dynamic = builder(&["mini", "--out", out.to_str().expect("utf8"), "--init", "/bin/ls"]);
    assert!(!dynamic.status.success());
    assert!(
        String::from_utf8_lossy(&dynamic.stderr).contains("is not a statically linked"),
        "{}",
        String::from_utf8_lossy(&dynamic.stderr)
    );
    let nokernel = builder(&["mini", "--out", out.to_str().expect("utf8"), "--kernel", "/nonexistent/vmlinuz-1.2.3"]);
    assert!(!nokernel.status.success());
    assert!(!out.exists(), "no image is left after a failure");
}

#[test]
fn debootstrap_says_clearly_that_it_needs_root() {
    // Run as nobody: the binary must be reachable, so copy it somewhere world-readable.
    let tmp = tempfile::tempdir().expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let copy = tmp.path().join("image-builder");
    fs::copy(env!("CARGO_BIN_EXE_image-builder"), &copy).expect("copy");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&copy)
        .args(["debootstrap", "--out"])
        .arg(tmp.path().join("i100"))
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root") && err.lines().count() == 1, "{err}");
    assert!(!tmp.path().join("i100").exists());
}

#[test]
fn list_shows_each_image_with_its_kind_size_date_and_whether_it_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    let good = images.join("i0");
    let out = builder(&["mini", "--out", good.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A copy with one byte of its initrd changed, and a directory with no image.toml.
    let damaged = images.join("i7");
    fs::create_dir_all(&damaged).expect("mkdir");
    for f in ["image.toml", "initrd.img", "vmlinux"] {
        fs::copy(good.join(f), damaged.join(f)).expect("copy");
    }
    let mut bytes = fs::read(damaged.join("initrd.img")).expect("read");
    bytes[64] ^= 0xff;
    fs::write(damaged.join("initrd.img"), bytes).expect("write");
    fs::create_dir_all(images.join("i12")).expect("mkdir");
    fs::create_dir_all(images.join("not-an-image")).expect("mkdir");

    let out = builder(&["list", images.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf8");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("IMAGE") && lines[0].contains("VERIFIES"), "{text}");
    assert_eq!(lines.len(), 4, "header and i0, i7, i12: {text}");
    let m = ImageManifest::load(&good).expect("manifest");
    assert!(lines[1].starts_with("i0 ") && lines[1].contains(" mini ") && lines[1].ends_with("  ok"), "{text}");
    assert!(
        lines[1].contains(&m.created) && lines[1].contains(&m.kernel_version) && lines[1].contains(" MiB"),
        "{text}"
    );
    assert!(lines[2].starts_with("i7 ") && lines[2].contains("initrd.img does not match image.toml"), "{text}");
    assert!(lines[3].starts_with("i12 ") && lines[3].contains("cannot read"), "{text}");

    let out = builder(&["list", images.to_str().expect("utf8"), "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(all["layers"], serde_json::json!([]), "no layers beside these images");
    let json = &all["images"];
    assert_eq!(json[0]["image"], "i0");
    assert_eq!(json[0]["verifies"], "ok");
    let size: u64 = ["initrd.img", "vmlinux"].iter().map(|f| fs::metadata(good.join(f)).expect("stat").len()).sum();
    assert_eq!(json[0]["bytes"], size);
    assert_eq!(json[1]["kind"], "mini");
    assert!(json[2]["kind"].is_null());
}
