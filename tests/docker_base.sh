#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's default base (python:3.11-slim-bookworm), for
# tests/test_docker.py.
#
# Base images cannot be pulled on the project's machines (no registry but PyPI and Debian's),
# so this script makes one from Debian packages:
#
#   1. debootstrap a minimal bookworm (python3 3.11, python3-venv, ca-certificates), tar it
#      (cached) and `podman import` it as  <image>-rootfs;
#   2. `podman build --isolation chroot` a derived image with a venv on PATH, so that `python`
#      and `pip` are CPython 3.11 and its pip, as in python:3.11-slim-bookworm. Like that image
#      it has no torch: the kdpipe image installs torch and everything else from a lock file.
#
# The result is cached by image name: a rerun returns at once while the image exists.
#
# Usage: tests/docker_base.sh [IMAGE]      (default localhost/kdpipe-test-python:3.11-bookworm)
# Environment:
#   KDPIPE_DOCKER_CACHE   cache dir for the rootfs tarball (default /var/cache/kdpipe-docker-test)
#   KDPIPE_BASE_REBUILD=1 rebuild the image even if it exists (the tarball is reused)
#   DEBIAN_MIRROR         debootstrap mirror (default http://deb.debian.org/debian)
set -euo pipefail

IMAGE="${1:-localhost/kdpipe-test-python:3.11-bookworm}"
ROOTFS_IMAGE="${IMAGE}-rootfs"
CACHE="${KDPIPE_DOCKER_CACHE:-/var/cache/kdpipe-docker-test}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm

log() { echo "[docker_base] $*" >&2; }

for tool in podman debootstrap tar; do
    command -v "$tool" >/dev/null || { log "missing tool: $tool"; exit 2; }
done

if [[ "${KDPIPE_BASE_REBUILD:-0}" != 1 ]] && podman image exists "$IMAGE"; then
    log "cached: $IMAGE"
    exit 0
fi

mkdir -p "$CACHE"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kdpipe-base.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- 1. the Debian root filesystem -------------------------------------------------
TARBALL="$CACHE/${SUITE}-minbase-python3.tar"
if [[ ! -s "$TARBALL" ]]; then
    log "debootstrap $SUITE (about a minute) ..."
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 30 "$WORK/debootstrap.log" >&2
        exit 1
    }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar --numeric-owner -C "$WORK/rootfs" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$WORK/rootfs"
fi
if [[ "${KDPIPE_BASE_REBUILD:-0}" == 1 ]] || ! podman image exists "$ROOTFS_IMAGE"; then
    log "podman import $TARBALL -> $ROOTFS_IMAGE"
    podman import --quiet "$TARBALL" "$ROOTFS_IMAGE" >/dev/null
fi

# --- 2. the derived image: python and pip on PATH, no torch ---------------------------
cat >"$WORK/Containerfile" <<EOF
FROM $ROOTFS_IMAGE
ENV PATH=/opt/venv/bin:\$PATH \\
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv \\
 && python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version; print(sys.version)" \\
 && ! python -c "import torch" 2>/dev/null
WORKDIR /
LABEL io.kdpipe.test-base="debootstrap $SUITE + python3 venv (stand-in for python:3.11-slim-bookworm)"
CMD ["python3"]
EOF
log "podman build $IMAGE ..."
podman build --isolation chroot -t "$IMAGE" -f "$WORK/Containerfile" "$WORK" >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2
    exit 1
}
log "built: $IMAGE"
