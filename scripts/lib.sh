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
    ensure_cross_packages
    # A root host runs each VM as its own uid from --vm-ids (no accounts to
    # create); the host checks at start that no account or group is in the range.
    command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs) first"
}

# The guest architectures other than this machine's (by `uname -m`), for
# which construir-init is cross-built (scripts/build-init).
foreign_init_archs() {
    case "$(uname -m)" in
        x86_64) echo aarch64 ;;
        aarch64) echo x86_64 ;;
        *) die "construir runs on x86_64 and aarch64 hosts, not $(uname -m)" ;;
    esac
}

# What arm64 guests need on an x86_64 machine (and the reverse): the
# emulator, qemu-user-static (image-builder runs the guest's busybox and
# debootstrap's chroot with it), the cross linker and C library, and
# Debian's Rust with the other architecture's std (scripts/build-init).
ensure_cross_packages() {
    local want=() arch deb
    arch=$(foreign_init_archs)
    deb=$([ "$arch" = aarch64 ] && echo arm64 || echo amd64)
    if [ "$arch" = aarch64 ]; then
        command -v qemu-system-aarch64 >/dev/null || want+=(qemu-system-arm)
        command -v aarch64-linux-gnu-gcc >/dev/null || want+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    else
        command -v x86_64-linux-gnu-gcc >/dev/null || want+=(gcc-x86-64-linux-gnu libc6-dev-amd64-cross)
    fi
    command -v "qemu-$arch-static" >/dev/null || want+=(qemu-user-static)
    command -v dpkg-deb >/dev/null || want+=(dpkg)
    if ! dpkg --print-foreign-architectures | grep -qx "$deb"; then
        as_root dpkg --add-architecture "$deb"
        apt_updated=
    fi
    [ -d "/usr/lib/rustlib/$arch-unknown-linux-gnu/lib" ] && [ -x /usr/bin/cargo ] ||
        want+=(rustc-web cargo-web "libstd-rust-web-dev:$deb")
    if [ ${#want[@]} -gt 0 ]; then apt_install "${want[@]}"; fi
    ensure_binfmt "$arch"
}

# debootstrap of another architecture configures its packages in a chroot:
# the kernel must run that architecture's programs through qemu-user-static,
# registered with binfmt_misc with the F flag (as Debian's package does
# under systemd; this machine may have no systemd to do it).
ensure_binfmt() {
    local arch=$1 dir=/proc/sys/fs/binfmt_misc
    [ -e "$dir/register" ] || as_root mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null ||
        { say "binfmt_misc cannot be mounted: image-builder debootstrap --arch for $arch will say so"; return 0; }
    if ! grep -qx enabled "$dir/qemu-$arch" 2>/dev/null; then
        [ -e "$dir/qemu-$arch" ] && echo -1 | as_root tee "$dir/qemu-$arch" >/dev/null
        as_root sh -c "cat /usr/lib/binfmt.d/qemu-$arch.conf > $dir/register" ||
            say "cannot register qemu-$arch with binfmt_misc: image-builder debootstrap --arch for $arch will say so"
    fi
}

# How much of a disk a run takes: the free room at the start, then the lowest
# seen every 5 s until watch_disk_report. A CI machine's free room varies; this
# says what ours needs when it runs short.
disk_free_mib() { df --output=avail -BM "$1" | tail -1 | tr -dc 0-9; }
watch_disk_start() {
    DISK_AT=$1
    DISK_START=$(disk_free_mib "$DISK_AT")
    DISK_LOWEST=$(mktemp)
    echo "$DISK_START" >"$DISK_LOWEST"
    say "disk: $((DISK_START / 1024)) GiB free on $(df --output=target "$DISK_AT" | tail -1) at the start"
    (
        lowest=$DISK_START
        # Ends with the script that started it, however that ends.
        while kill -0 $$ 2>/dev/null && sleep 5; do
            free=$(disk_free_mib "$DISK_AT")
            if [ "$free" -lt "$lowest" ]; then lowest=$free; echo "$lowest" >"$DISK_LOWEST"; fi
        done
    ) &
    DISK_WATCH=$!
}
watch_disk_report() {
    kill "$DISK_WATCH" 2>/dev/null || true
    local lowest
    lowest=$(cat "$DISK_LOWEST")
    rm -f "$DISK_LOWEST"
    say "disk: this run took up to $(((DISK_START - lowest) / 1024)).$(((DISK_START - lowest) % 1024 * 10 / 1024)) GiB ($((lowest / 1024)) GiB free at the lowest)"
}
