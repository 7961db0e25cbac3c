#!/bin/sh
# Creates local stand-ins for the two base images the Dockerfile names, `debian:bookworm-slim`
# and `rust:${RUST_VERSION}-bookworm`, from Debian packages (debootstrap) and rustup alone.
#
# Why it exists: the machines netpol is developed on reach deb.debian.org, crates.io and
# static.rust-lang.org but no container registry (Docker Hub, ghcr.io, quay.io, ... do not
# resolve), so `docker build` cannot pull its base images there. With these stand-ins in the
# local image store the Dockerfile builds unchanged, which is how it was verified (docs/
# deploy-kind.md, "Building the image"). Where Docker Hub is reachable do NOT run this: the
# official images are what the Dockerfile is meant for, and a local image under the same name
# hides them (`docker rmi debian:bookworm-slim rust:1.95.0-bookworm` undoes it).
#
# How faithful they are:
# - debian:bookworm-slim: `debootstrap --variant=minbase bookworm` (the package set the official
#   image is built from), sources in /etc/apt/sources.list.d/debian.sources for bookworm,
#   bookworm-updates and bookworm-security at deb.debian.org exactly as the official image has
#   them, upgraded to the current point release and security updates, the official images'
#   apt settings (docker-clean, ...) and slim dpkg excludes (no docs, man pages, locales), no
#   apt lists, CMD bash.
# - rust:VERSION-bookworm: the official one is buildpack-deps:bookworm plus rustup. Here: the
#   same minbase root and apt settings (not slimmed: buildpack-deps starts from debian:bookworm),
#   a SUBSET of buildpack-deps' packages (compilers, make, pkg-config, git, curl,
#   ca-certificates, the common -dev libraries; not its imaging/database libraries), and
#   rustup-init from static.rust-lang.org (checksum verified) run the way the official
#   Dockerfile runs it: RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo,
#   `--profile minimal --default-toolchain VERSION`, PATH=/usr/local/cargo/bin:... .
#   Being a subset, a build that works on it works on the official image too.
#   One addition: the certificate authorities this machine added locally (the *.crt in
#   EXTRA_CA_DIR, default /usr/local/share/ca-certificates), because HTTPS egress here passes a
#   TLS-intercepting proxy whose CA rustup and cargo must trust (without it: "invalid peer
#   certificate: UnknownIssuer"). Only the rust stand-in (the build stage) gets them; the
#   runtime image, built from debian:bookworm-slim, does not.
#
# Usage (root; needs debootstrap, curl, sha256sum and a running docker or podman):
#   deploy/local-base-images.sh            # creates whichever of the two images is missing
#   FORCE=1 deploy/local-base-images.sh    # recreates both
# Environment: RUST_VERSION (default 1.95.0, the Dockerfile's ARG), MIRROR (default
# http://deb.debian.org/debian), ENGINE (default docker), WORK (scratch directory, default
# /var/tmp/netpol-base-images, removed at the end), EXTRA_CA_DIR (see above; empty: none).
set -eu

RUST_VERSION=${RUST_VERSION:-1.95.0}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ENGINE=${ENGINE:-docker}
WORK=${WORK:-/var/tmp/netpol-base-images}
case "$WORK" in
  /?*/?*) ;;
  *) echo "WORK=$WORK: give a scratch directory at least two levels deep" >&2 && exit 1 ;;
esac
FORCE=${FORCE:-0}
EXTRA_CA_DIR=${EXTRA_CA_DIR-/usr/local/share/ca-certificates}
SUITE=bookworm
DEBIAN_TAG=debian:bookworm-slim
RUST_TAG=rust:${RUST_VERSION}-bookworm

# buildpack-deps:bookworm's curl and scm layers and the build tools of its last layer that
# compiling Rust crates with C parts can use.
RUST_PACKAGES="ca-certificates curl gnupg netbase wget git openssh-client procps \
  autoconf automake bzip2 dpkg-dev file g++ gcc libc6-dev libssl-dev libtool make patch \
  pkg-config unzip xz-utils zlib1g-dev"

say() { echo "local-base-images: $*"; }
die() { say "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot)"
for tool in debootstrap curl sha256sum "$ENGINE"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
"$ENGINE" info >/dev/null 2>&1 || die "\`$ENGINE info\` fails: start the container engine first"

case "$(dpkg --print-architecture)" in
  amd64) RUST_ARCH=x86_64-unknown-linux-gnu ;;
  arm64) RUST_ARCH=aarch64-unknown-linux-gnu ;;
  *) die "architecture $(dpkg --print-architecture) not handled" ;;
esac

have() { [ "$FORCE" != 1 ] && "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# Mounts made for chroot work, unmounted on every exit.
MOUNTS=""
cleanup() {
  for m in $MOUNTS; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  MOUNTS=""
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

enter() { # enter ROOT: prepares ROOT for `chroot` (proc, DNS)
  mount -t proc proc "$1/proc"
  MOUNTS="$1/proc $MOUNTS"
  cp /etc/resolv.conf "$1/etc/resolv.conf"
}

leave() { # leave ROOT: undoes enter and drops what an image must not carry
  case "$1" in "$WORK"/?*) ;; *) die "leave: $1 is not below $WORK" ;; esac
  umount "$1/proc"
  MOUNTS=""
  chroot "$1" apt-get clean
  rm -rf "$1"/var/lib/apt/lists/* "$1"/var/log/apt/* "$1"/tmp/* "$1"/var/tmp/*
  # The engine bind-mounts its own resolv.conf into containers.
  : >"$1/etc/resolv.conf"
}

chroot_apt() { # chroot_apt ROOT ARGS...: apt-get in ROOT, non-interactive
  root=$1
  shift
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get -y -o Dpkg::Use-Pty=0 "$@"
}

minbase() { # minbase ROOT: a bookworm root file system as debian:bookworm-slim has it
  say "debootstrap --variant=minbase $SUITE into $1"
  debootstrap --variant=minbase "$SUITE" "$1" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -f "$1/etc/apt/sources.list"
  cat >"$1/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # The apt settings every official Debian image carries (debuerreotype): downloaded .debs are
  # deleted after each install, so `apt-get install` in a Dockerfile leaves no archives in
  # its layer; no translations; compressed lists.
  cat >"$1/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$1/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' >"$1/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' \
    >"$1/etc/apt/apt.conf.d/docker-autoremove-suggests"
  enter "$1"
  chroot_apt "$1" update
  chroot_apt "$1" upgrade
}

slim() { # slim ROOT: what makes debian:*-slim slim: no docs, man pages, locales (dpkg excludes)
  case "$1" in "$WORK"/?*) ;; *) die "slim: $1 is not below $WORK" ;; esac
  cat >"$1/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
  find "$1/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$1/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$1"/usr/share/groff/* "$1"/usr/share/info/* "$1"/usr/share/linda/* \
    "$1"/usr/share/lintian/* "$1"/usr/share/man/*
  find "$1/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
}

import() { # import ROOT TAG CHANGES...: the root file system as image TAG
  root=$1
  tag=$2
  shift 2
  say "importing $tag"
  tar --numeric-owner --xattrs -C "$root" \
    --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -c . |
    "$ENGINE" import "$@" - "$tag" >/dev/null
  "$ENGINE" image ls "$tag"
}

PATH_DEFAULT=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

rm -rf "$WORK"
mkdir -p "$WORK"

# The minbase root both images start from, made once.
base() {
  [ -d "$WORK/base" ] && return 0
  minbase "$WORK/base"
  leave "$WORK/base"
}

if have "$DEBIAN_TAG"; then
  say "$DEBIAN_TAG exists (FORCE=1 recreates it)"
else
  base
  cp -a "$WORK/base" "$WORK/slim"
  slim "$WORK/slim"
  import "$WORK/slim" "$DEBIAN_TAG" --change "ENV PATH=$PATH_DEFAULT" --change 'CMD ["bash"]'
  rm -rf "$WORK/slim"
fi

if have "$RUST_TAG"; then
  say "$RUST_TAG exists (FORCE=1 recreates it)"
else
  base
  root=$WORK/rust
  cp -a "$WORK/base" "$root"
  enter "$root"
  chroot_apt "$root" update
  # shellcheck disable=SC2086 # a list of package names
  chroot_apt "$root" install --no-install-recommends $RUST_PACKAGES
  if [ -n "$EXTRA_CA_DIR" ] && ls "$EXTRA_CA_DIR"/*.crt >/dev/null 2>&1; then
    say "trusting the local CAs $(cd "$EXTRA_CA_DIR" && echo *.crt) in $RUST_TAG"
    cp "$EXTRA_CA_DIR"/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
  fi
  say "rustup-init for $RUST_ARCH, toolchain $RUST_VERSION"
  url=https://static.rust-lang.org/rustup/dist/$RUST_ARCH/rustup-init
  curl --proto '=https' --tlsv1.2 -fsS -o "$root/tmp/rustup-init" "$url"
  want=$(curl --proto '=https' --tlsv1.2 -fsS "$url.sha256" | cut -d' ' -f1)
  echo "$want  $root/tmp/rustup-init" | sha256sum -c - >/dev/null || die "rustup-init checksum mismatch"
  chmod +x "$root/tmp/rustup-init"
  chroot "$root" env RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH="/usr/local/cargo/bin:$PATH_DEFAULT" sh -ec "
      /tmp/rustup-init -y --no-modify-path --profile minimal \
        --default-toolchain $RUST_VERSION --default-host $RUST_ARCH
      chmod -R a+w /usr/local/rustup /usr/local/cargo
      rustup --version; cargo --version; rustc --version"
  leave "$root"
  import "$root" "$RUST_TAG" \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change "ENV PATH=/usr/local/cargo/bin:$PATH_DEFAULT" \
    --change "ENV RUST_VERSION=$RUST_VERSION" \
    --change 'CMD ["bash"]'
fi
