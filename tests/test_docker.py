"""Build the project's Dockerfile from its CPU lock and run kdpipe inside the image.

There is no Docker engine on the project's machines, so this uses Debian's podman and
buildah with chroot isolation (``podman run`` cannot work there: setrlimit is not
permitted), and a stand-in for the Dockerfile's default base ``python:3.11-slim-bookworm``
built by ``tests/docker_base.sh`` (debootstrap bookworm + a python venv, no torch), since
base images cannot be pulled.

The image is built with ``--build-arg LOCK=locks/image-cpu.txt``, offline: on the host,
``pip download --require-hashes -r locks/image-cpu.txt`` fills a wheelhouse cached by the
lock's sha256 (``$KDPIPE_DOCKER_CACHE/lock-wheels/<sha>``), which is mounted into the build
together with a pip.conf that says ``no-index``. So every package in the image, torch
included, is the file the lock names and hashes, and the build never reaches a registry.

Then, inside the image: ``kdpipe --help``; /opt/kdpipe/image.json (base, lock and its sha256,
versions); ``cache-teacher`` and ``train-student`` on the demo data; ``cache-teacher`` then
``kdpipe reproduce`` on that cache, which must give the same shard bytes.

Needs root and: apt-get install -y podman buildah debootstrap
(see docs/docker.md). Measured on a 2-core machine: cold (nothing cached) about 7 min
(base 2 min 17 s, wheelhouse 14 s, image build 3 min 15 s, kdpipe in the image 1 min), warm
(base image, wheels and layers cached) about 75 s, most of it kdpipe running in the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
BASE_SCRIPT = REPO / "tests" / "docker_base.sh"
BASE_IMAGE = os.environ.get("KDPIPE_TEST_BASE_IMAGE", "localhost/kdpipe-test-python:3.11-bookworm")
IMAGE = os.environ.get("KDPIPE_TEST_IMAGE", "localhost/kdpipe:test")
# Demo data (data/teacher, data/shakespeare/heldout); overridable to try other data.
DATA = Path(os.environ.get("KDPIPE_TEST_DATA", REPO / "data"))
CACHE = Path(os.environ.get("KDPIPE_DOCKER_CACHE", "/var/cache/kdpipe-docker-test"))
# The lock the image is built from (a path in the repository, as the Dockerfile's LOCK arg).
LOCK = "locks/image-cpu.txt"

TOOLS = ("podman", "buildah", "debootstrap")
_missing = [t for t in TOOLS if shutil.which(t) is None]
if _missing:
    pytest.skip(
        f"docker test needs {', '.join(_missing)} (apt-get install -y podman buildah debootstrap)",
        allow_module_level=True,
    )
if os.geteuid() != 0:
    pytest.skip("docker test needs root (debootstrap, podman with chroot isolation)",
                allow_module_level=True)

# Wheel tags of the image's python (bookworm: CPython 3.11, x86_64, glibc 2.36), so the
# download does not depend on the host's python.
_PLATFORMS = [f"manylinux_2_{g}_x86_64" for g in (36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 17, 12, 5)]
_PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64", "any"]
TARGET_FLAGS = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                "--abi", "cp311", "--abi", "abi3", "--abi", "none"]
for _p in _PLATFORMS:
    TARGET_FLAGS += ["--platform", _p]


def _run(cmd, *, timeout=900, check=True, env=None, log_name=None):
    """Run a command, return CompletedProcess; on failure show the tail of its output."""
    t0 = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, env=env)
    dt = time.monotonic() - t0
    print(f"[docker] {log_name or cmd[0]}: rc={proc.returncode} in {dt:.1f}s", flush=True)
    if check and proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-60:])
        pytest.fail(f"command failed (rc={proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return proc


def _lock_sha256() -> str:
    return hashlib.sha256((REPO / LOCK).read_bytes()).hexdigest()


def _lock_wheelhouse() -> Path:
    """Every file the lock pins, for the image's python, checked against the lock's hashes;
    cached by the lock's sha256 (older wheelhouses are removed)."""
    key = hashlib.sha256((_lock_sha256() + "\n".join(TARGET_FLAGS)).encode()).hexdigest()[:16]
    root = CACHE / "lock-wheels"
    wheels = root / key
    stamp = wheels / ".complete"
    if not stamp.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        # torch==2.13.0+cpu is not on PyPI: pip finds it where it is configured to look
        # (find-links; on the project's machines the wheel lies in /opt/wheels).
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
              "--require-hashes", "-d", wheels, *TARGET_FLAGS, "-r", REPO / LOCK],
             log_name=f"pip download --require-hashes -r {LOCK}")
        stamp.touch()
    if root.is_dir():
        for old in root.iterdir():
            if old != wheels:
                shutil.rmtree(old, ignore_errors=True)
    return wheels


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    t0 = time.monotonic()
    env = dict(os.environ, KDPIPE_DOCKER_CACHE=str(CACHE))
    _run(["bash", BASE_SCRIPT, BASE_IMAGE], env=env, timeout=900, log_name="tests/docker_base.sh")

    wheels = _lock_wheelhouse()
    conf_dir = tmp_path_factory.mktemp("pipconf")
    pip_conf = conf_dir / "pip.conf"
    pip_conf.write_text("[global]\nno-index = true\nfind-links = /kdpipe-wheels\n")

    old = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", IMAGE],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
    cmd = ["podman", "build", "--isolation", "chroot",
           "-v", "/etc/ssl/certs:/etc/ssl/certs:ro",
           "-v", f"{wheels}:/kdpipe-wheels:ro",
           "-v", f"{pip_conf}:/etc/pip.conf:ro",
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
           "--build-arg", f"LOCK={LOCK}",
           "--build-arg", f"KDPIPE_IMAGE_TAG={IMAGE}",
           "-t", IMAGE, "-f", REPO / "Dockerfile", REPO]
    _run(cmd, timeout=900, log_name="podman build")
    new = _run(["podman", "image", "inspect", "--format", "{{.Id}}", IMAGE], log_name="podman image inspect").stdout.strip()
    if old and old != new:
        # The previous build of IMAGE is now untagged: remove it and its own layers so that
        # repeated runs do not pile up images (the layers still in use are kept).
        subprocess.run(["podman", "rmi", old], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"[docker] image ready in {time.monotonic() - t0:.1f}s", flush=True)
    return IMAGE


@pytest.fixture(scope="module")
def container(image):
    name = f"kdpipe-test-{uuid.uuid4().hex[:8]}"
    cid = _run(["buildah", "from", "--pull=never", "--name", name, image],
               log_name="buildah from").stdout.strip().splitlines()[-1]
    yield cid
    subprocess.run(["buildah", "rm", cid], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _in_image(cid, argv, *, mounts=(), timeout=600, check=True, log_name=None):
    cmd = ["buildah", "run", "--isolation", "chroot",
           "-e", "HF_HUB_OFFLINE=1", "-e", "TRANSFORMERS_OFFLINE=1"]
    for host, inside in mounts:
        cmd += ["-v", f"{host}:{inside}"]
    cmd += [cid, "--", *argv]
    return _run(cmd, timeout=timeout, check=check, log_name=log_name or " ".join(argv[:2]))


def _kdpipe(cid, args, **kw):
    return _in_image(cid, ["kdpipe", *args], **kw)


def _lock_versions(path: Path) -> dict[str, str]:
    return _lock_versions_from_text(path.read_text())


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def test_image_identity(image):
    out = _run(["podman", "image", "inspect", "--format", "{{json .Config}}", image],
               log_name="podman image inspect").stdout
    config = json.loads(out)
    assert f"KDPIPE_IMAGE={image}" in config["Env"]
    assert "KDPIPE_IMAGE_INFO=/opt/kdpipe/image.json" in config["Env"]
    assert config["Entrypoint"] == ["kdpipe"]
    assert config["WorkingDir"] == "/workspace"
    assert config["Labels"]["io.kdpipe.lock"] == LOCK


def test_image_info_records_base_and_lock(container):
    """/opt/kdpipe/image.json says what the image was built from, and the image holds exactly
    the lock's versions (the build installed from the lock, nothing else)."""
    info = json.loads(_in_image(container, ["cat", "/opt/kdpipe/image.json"]).stdout)
    lock = _lock_versions(REPO / LOCK)
    assert info == {
        "image_tag": IMAGE,
        "base_image": BASE_IMAGE,
        "lock_file": LOCK,
        "lock_sha256": _lock_sha256(),
        "kdpipe_version": _pyproject_version(),
        "torch": lock["torch"],
    }
    freeze = _in_image(container, ["python", "-m", "pip", "list", "--format=freeze"],
                       log_name="pip list").stdout
    installed = _lock_versions_from_text(freeze)
    installed.pop("kdpipe")
    # The base's own pip is not in the image lock (python:3.11-slim brings its pip too).
    installed.pop("pip", None)
    assert installed == lock


def _lock_versions_from_text(text: str) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.M)
    return {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in pins}


def test_help(container):
    proc = _kdpipe(container, ["--help"])
    assert "Usage" in proc.stdout


def _demo_data() -> Path:
    for need in (DATA / "teacher", DATA / "shakespeare" / "heldout"):
        if not need.exists():
            pytest.skip(f"demo data missing: {need}")
    return DATA


def test_stages_on_demo_data(container, tmp_path):
    data = _demo_data()
    out = tmp_path / "out"
    out.mkdir()
    vocab = 2048
    teacher_cfg = data / "teacher" / "config.json"
    if teacher_cfg.exists():
        vocab = json.loads(teacher_cfg.read_text()).get("vocab_size", vocab)
    student_cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    }
    (out / "student_config.json").write_text(json.dumps(student_cfg, indent=2))
    mounts = [(data, "/workspace/data:ro"), (out, "/out")]

    _kdpipe(container, ["cache-teacher", "--teacher", "data/teacher", "--data", "data/shakespeare/heldout",
                        "--out", "/out/cache", "--seq-len", "64", "--limit-rows", "16", "--top-k", "16"],
            mounts=mounts)
    manifest = out / "cache" / "manifest.json"
    assert manifest.is_file()
    software = json.loads(manifest.read_text())["software"]
    # The image identity: the tag (ENV KDPIPE_IMAGE, from --build-arg KDPIPE_IMAGE_TAG) and the
    # build record $KDPIPE_IMAGE_INFO names, with the lock's sha256.
    assert software["docker_image"] == IMAGE
    assert software["image"]["image_tag"] == IMAGE
    assert software["image"]["lock_sha256"] == _lock_sha256()
    assert software["image"]["base_image"] == BASE_IMAGE

    _kdpipe(container, ["train-student", "--cache", "/out/cache", "--student", "/out/student_config.json",
                        "--out", "/out/student", "--steps", "5", "--batch-size", "4"],
            mounts=mounts)
    # train-student's --out is a run directory; the weights may sit in a subfolder (model/).
    weights = sorted((out / "student").rglob("model.safetensors"))
    assert weights, f"no model.safetensors under {out / 'student'}"


def _shard_hashes(cache: Path) -> dict[str, str]:
    """sha256 of every shard file, by its path in the cache (computed here, not read from a manifest)."""
    files = sorted(p for p in (cache / "shards").rglob("*") if p.is_file())
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_cache_reproduces_in_image(container, tmp_path):
    """cache-teacher, then `kdpipe reproduce` on that cache, both inside the image: exit 0 and
    the same shard bytes (compared here too, file by file)."""
    data = _demo_data()
    out = tmp_path / "out"
    out.mkdir()
    mounts = [(data, "/workspace/data:ro"), (out, "/out")]
    _kdpipe(container, ["cache-teacher", "--teacher", "data/teacher", "--data", "data/shakespeare/heldout",
                        "--out", "/out/cache", "--seq-len", "64", "--limit-rows", "24", "--top-k", "16",
                        "--temperature", "1", "--temperature", "2"],
            mounts=mounts)
    proc = _kdpipe(container, ["reproduce", "/out/cache", "--out", "/out/again"], mounts=mounts, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, f"kdpipe reproduce exited {proc.returncode}:\n{proc.stdout[-3000:]}"
    first, again = _shard_hashes(out / "cache"), _shard_hashes(out / "again")
    assert first and first == again
    recorded = json.loads((out / "cache" / "manifest.json").read_text())
    rerun = json.loads((out / "again" / "manifest.json").read_text())
    assert [s["sha256"] for s in recorded["shards"]] == [s["sha256"] for s in rerun["shards"]]
    # The re-run was made by the same image build.
    assert rerun["software"]["image"] == recorded["software"]["image"]
