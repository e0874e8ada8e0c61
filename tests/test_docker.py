"""Build the project's Dockerfile and run kdpipe inside the image.

There is no Docker engine on the project's machines, so this uses Debian's podman and
buildah with chroot isolation (``podman run`` cannot work there: setrlimit is not
permitted), and a stand-in for the official PyTorch base image built by
``tests/docker_base.sh`` (debootstrap bookworm + a CPU torch wheel), since base images
cannot be pulled.

The image build runs offline: the project's dependencies are downloaded on the host
into a cached wheelhouse (``$KDPIPE_DOCKER_CACHE/project-wheels``), which is mounted
into the build together with a pip.conf that says ``no-index``. So the build can never
fetch torch (it must come from the base) or anything else from a registry.

Needs root and: apt-get install -y podman buildah debootstrap
(see docs/docker.md). Measured on a 2-core machine: cold (nothing cached) about 3 min,
warm (base image, wheels and layers cached) about 20 s.
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
BASE_IMAGE = os.environ.get("KDPIPE_TEST_BASE_IMAGE", "localhost/kdpipe-test-base:bookworm")
IMAGE = os.environ.get("KDPIPE_TEST_IMAGE", "localhost/kdpipe:test")
# Demo data (data/teacher, data/shakespeare/heldout); overridable to try other data.
DATA = Path(os.environ.get("KDPIPE_TEST_DATA", REPO / "data"))
CACHE = Path(os.environ.get("KDPIPE_DOCKER_CACHE", "/var/cache/kdpipe-docker-test"))
# The torch the stand-in base has; pinned for the host-side wheel download too, so that a
# dependency that pulls torch in gets the CPU wheel from disk, never PyPI's CUDA build.
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0+cpu")

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


def _requirements() -> list[str]:
    try:
        import tomllib
    except ImportError:  # python 3.10
        import tomli as tomllib
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    build = pyproject["build-system"]["requires"]  # for pip's isolated build of kdpipe
    name = lambda d: re.match(r"[A-Za-z0-9._-]+", d).group().lower()  # noqa: E731
    # torch comes from the base image; the image build pins it to the installed one.
    return [d for d in deps if name(d) != "torch"] + list(build)


def _project_wheelhouse() -> Path:
    """Wheels for the project's dependencies (torch excluded), cached by requirement set."""
    reqs = _requirements()
    key = hashlib.sha256("\n".join(reqs + [TORCH_SPEC, *TARGET_FLAGS]).encode()).hexdigest()[:16]
    wheels = CACHE / "project-wheels"
    stamp = wheels / f".complete-{key}"
    if stamp.exists():
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    constraint = wheels / ".torch-constraint.txt"
    constraint.write_text(TORCH_SPEC + "\n")
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
          "-d", wheels, "-c", constraint, *TARGET_FLAGS, *reqs],
         log_name="pip download (project wheels)")
    for old in wheels.glob(".complete-*"):
        old.unlink()
    stamp.touch()
    return wheels


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    t0 = time.monotonic()
    env = dict(os.environ, PYTHON=sys.executable, KDPIPE_DOCKER_CACHE=str(CACHE), TORCH_SPEC=TORCH_SPEC)
    _run(["bash", BASE_SCRIPT, BASE_IMAGE], env=env, timeout=900, log_name="tests/docker_base.sh")

    wheels = _project_wheelhouse()
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


def _kdpipe(cid, args, *, mounts=(), timeout=600, check=True):
    cmd = ["buildah", "run", "--isolation", "chroot",
           "-e", "HF_HUB_OFFLINE=1", "-e", "TRANSFORMERS_OFFLINE=1"]
    for host, inside in mounts:
        cmd += ["-v", f"{host}:{inside}"]
    cmd += [cid, "--", "kdpipe", *args]
    return _run(cmd, timeout=timeout, check=check, log_name=f"kdpipe {args[0]}")


def test_image_identity(image):
    out = _run(["podman", "image", "inspect", "--format", "{{json .Config}}", image],
               log_name="podman image inspect").stdout
    config = json.loads(out)
    assert f"KDPIPE_IMAGE={image}" in config["Env"]
    assert config["Entrypoint"] == ["kdpipe"]
    assert config["WorkingDir"] == "/workspace"


def test_help(container):
    proc = _kdpipe(container, ["--help"])
    assert "Usage" in proc.stdout


def test_stages_on_demo_data(container, tmp_path):
    helptext = _kdpipe(container, ["--help"]).stdout
    missing = [c for c in ("cache-teacher", "train-student") if c not in helptext]
    if missing:
        pytest.skip(f"kdpipe has no {' / '.join(missing)} subcommand yet (TODO: remove this skip once they land)")
    data = DATA
    for need in (data / "teacher", data / "shakespeare" / "heldout"):
        if not need.exists():
            pytest.skip(f"demo data missing: {need}")

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
    # The image identity (ENV KDPIPE_IMAGE, from --build-arg KDPIPE_IMAGE_TAG) is recorded.
    assert IMAGE in manifest.read_text(), "manifest.json does not record $KDPIPE_IMAGE"

    _kdpipe(container, ["train-student", "--cache", "/out/cache", "--student", "/out/student_config.json",
                        "--out", "/out/student", "--steps", "5", "--batch-size", "4"],
            mounts=mounts)
    # train-student's --out is a run directory; the weights may sit in a subfolder (model/).
    weights = sorted((out / "student").rglob("model.safetensors"))
    assert weights, f"no model.safetensors under {out / 'student'}"
