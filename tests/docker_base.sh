#!/usr/bin/env bash
# Build a local stand-in for the official PyTorch image, for tests/test_docker.py.
#
# Base images cannot be pulled on the project's machines (no registry but PyPI and
# Debian's), so this script makes one from Debian packages:
#
#   1. debootstrap a minimal bookworm (python3 3.11, python3-venv, ca-certificates),
#      tar it (cached) and `podman import` it as  <image>-rootfs;
#   2. download a CPU torch wheel and its dependencies on the host (cached wheelhouse:
#      the cp311 CPU wheel lies on the machine's disk, so nothing big is fetched);
#   3. `podman build --isolation chroot` a derived image with a venv on PATH and that
#      torch installed, offline (--no-index). It plays the role of
#      pytorch/pytorch:*-runtime: a python with pip and torch already in it.
#
# The result is cached by image name: a rerun returns at once while the image exists.
#
# Usage: tests/docker_base.sh [IMAGE]      (default localhost/kdpipe-test-base:bookworm)
# Environment:
#   KDPIPE_DOCKER_CACHE   cache dir for the rootfs tarball and wheels
#                         (default /var/cache/kdpipe-docker-test)
#   KDPIPE_BASE_REBUILD=1 rebuild the image even if it exists (the tarball is reused)
#   TORCH_SPEC            torch requirement to install (default torch==2.13.0+cpu)
#   PYTHON                host python whose pip downloads the wheels (default python3)
#   DEBIAN_MIRROR         debootstrap mirror (default http://deb.debian.org/debian)
set -euo pipefail

IMAGE="${1:-localhost/kdpipe-test-base:bookworm}"
ROOTFS_IMAGE="${IMAGE}-rootfs"
CACHE="${KDPIPE_DOCKER_CACHE:-/var/cache/kdpipe-docker-test}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
PYTHON="${PYTHON:-python3}"
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

# --- 2. torch and its dependencies, as wheels for cp311 / manylinux x86_64 ----------
# Target flags make this independent of the host's own python. TORCH_SPEC must name
# the CPU build (a "+cpu" local version): PyPI's plain torch is a multi-GB CUDA build.
WHEELS="$CACHE/base-wheels"
platforms=()
for g in 39 38 37 36 35 34 33 32 31 30 29 28 27 26 25 24 17 12 5; do
    platforms+=(--platform "manylinux_2_${g}_x86_64")
done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
            --platform manylinux1_x86_64 --platform linux_x86_64 --platform any)
log "wheels for $TORCH_SPEC -> $WHEELS"
"$PYTHON" -m pip download --quiet --disable-pip-version-check -d "$WHEELS" \
    --only-binary=:all: --python-version 3.11 --implementation cp \
    --abi cp311 --abi abi3 --abi none "${platforms[@]}" "$TORCH_SPEC" \
    >"$WORK/download.log" 2>&1 || { tail -n 30 "$WORK/download.log" >&2; exit 1; }

# --- 3. the derived image: venv on PATH, torch installed -----------------------------
cat >"$WORK/Containerfile" <<EOF
FROM $ROOTFS_IMAGE
ENV PATH=/opt/venv/bin:\$PATH \\
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv \\
 && python -m pip install --no-cache-dir --no-index --find-links /base-wheels '$TORCH_SPEC' \\
 && python -c "import torch; print('torch', torch.__version__)"
WORKDIR /workspace
LABEL io.kdpipe.test-base="debootstrap $SUITE + $TORCH_SPEC"
CMD ["python3"]
EOF
log "podman build $IMAGE (installs torch, about a minute) ..."
podman build --isolation chroot \
    -v "$WHEELS:/base-wheels:ro" \
    -t "$IMAGE" -f "$WORK/Containerfile" "$WORK" >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2
    exit 1
}
log "built: $IMAGE"
