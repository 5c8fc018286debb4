# Shared by scripts/demo, scripts/test and scripts/bench: install what is
# missing, find the tools. Sourced, not run.

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $* (run as root, or install sudo)"
    fi
}

apt_updated=
apt_install() {
    [ -n "$apt_updated" ] || { say "apt-get update"; as_root apt-get update -qq >&2; apt_updated=1; }
    say "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "$@" >&2
}

# Installs the Debian packages construir needs, when they are missing:
# QEMU, the kernel images are built from, static busybox, xz, mkfs.ext4, debootstrap.
ensure_packages() {
    local want=()
    command -v xz >/dev/null || want+=(xz-utils)
    command -v file >/dev/null || want+=(file)
    command -v cpio >/dev/null || want+=(cpio)
    command -v mkfs.ext4 >/dev/null || want+=(e2fsprogs)
    command -v debootstrap >/dev/null || want+=(debootstrap)
    command -v systemd-analyze >/dev/null || want+=(systemd)
    command -v chromium >/dev/null || want+=(chromium fonts-dejavu-core)
    command -v openssl >/dev/null || want+=(openssl)
    # The build caches' test and bench configure GNU hello here before a VM builds it.
    command -v gcc >/dev/null || want+=(gcc)
    command -v make >/dev/null || want+=(make)
    # The TLS test signs in to the page with curl.
    command -v curl >/dev/null || want+=(curl)
    # The debug sessions' tests drive `construir debug` in a real terminal.
    command -v tmux >/dev/null || want+=(tmux)
    # construir-gitlab fetches a CI job's repository with git (its tests: a repository here).
    command -v git >/dev/null || want+=(git)
    # The farm's tests run the server against PostgreSQL too (a private cluster each).
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || want+=(postgresql)
    # The Slurm executor's tests and bench start a one-node cluster (scripts/slurm-cluster).
    { command -v sbatch >/dev/null && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; } || want+=(slurm-wlm munge)
    [ -x /bin/busybox ] && file -L /bin/busybox | grep -q 'statically linked' || want+=(busybox-static)
    compgen -G '/boot/vmlinuz-*' >/dev/null || want+=(linux-image-amd64)
    if ! command -v qemu-system-x86_64 >/dev/null; then
        # qemu-utils may be a newer build than the archive's qemu-system-x86
        # and then conflicts with it: install both at the same version.
        [ -n "$apt_updated" ] || { say "apt-get update"; as_root apt-get update -qq >&2; apt_updated=1; }
        local ver
        ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no qemu-system-x86 package in the apt sources"
        want+=(qemu-system-x86 "qemu-utils=$ver")
    fi
    if [ ${#want[@]} -gt 0 ]; then apt_install "${want[@]}"; fi
    # A root host runs each VM as its own uid from --vm-ids (no accounts to
    # create); the host checks at start that no account or group is in the range.
    command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs) first"
}
