"""Packaging: what ``pip install .`` and ``python -m build`` give a user.

The checkout (its tracked and untracked, not ignored files) is copied to a temporary folder and built
with ``python -m build --no-isolation``: the sdist first, then the wheel from the sdist, which is what
``pip install .`` builds too. Without isolation no network is needed; the backend is the test venv's
setuptools, which must satisfy pyproject's ``[build-system]`` requirement (the ``test`` extra installs
``build`` and ``setuptools``). The build must print no deprecation warnings.

The wheel must hold every Python package of the source tree (a folder with an ``__init__.py`` under
``src/kdpipe/``, whose ``pipeline`` and ``stages`` are symlinks to the top-level folders; a package the
build misses is named in the failure) as real files, and nothing else: no ``tests/``, no ``data/``.
The sdist holds real files too.

Then the wheel is installed with ``pip install --no-deps --no-index`` into a fresh venv. That venv gets
the dependencies (torch, numpy, zarr, ...) from the test venv's site-packages through a one-line ``.pth``
path, added after the install. A plain path line puts the folder on ``sys.path`` without running the
``.pth`` files inside it, so the test venv's editable install of kdpipe stays inactive; the test checks
that every kdpipe module comes from the fresh venv and none from the checkout. There it imports kdpipe,
runs the ``kdpipe`` console script (``--version``, ``cache-teacher --help``).

An editable install (what ``make setup`` does) of a copy of the checkout named ``kdpipe`` must be a
plain path entry, not an import hook, build without deprecation warnings, and import from the folder
above that copy (see tests/test_imports.py).

Deselect with ``-m 'not packaging'``. About 15-25 s on a 2-core machine (the build 3 s, each fresh venv
1.5 s, the editable install 3 s, the kdpipe imports the rest).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Where the source tree keeps the import package (src layout; pipeline and stages are symlinks in it).
SOURCE_ROOT = REPO / "src" / "kdpipe"
# Never copied into the build folder when the checkout is not a git repository.
NOT_SOURCE = {".git", ".venv", "venv", "build", "dist", "runs", "out", ".pytest_cache", ".ruff_cache", "__pycache__"}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(args, *, cwd, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _check_build_tools() -> None:
    from packaging.requirements import Requirement

    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("`python -m build` is not installed; the test extra has it: pip install -e '.[test]'")
    for spec in PYPROJECT["build-system"]["requires"]:
        req = Requirement(spec)
        try:
            have = version(req.name)
        except PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            pytest.fail(f"pyproject's build requirement {spec!r} is not met in {sys.prefix} (found {have}): "
                        "the build without isolation uses it; pip install -e '.[test]' installs it")


def _copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=False)
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist, say)
        shutil.copytree(REPO, dest, symlinks=True, ignore=lambda _d, names: [
            n for n in names if n in NOT_SOURCE or n.endswith(".egg-info")])
        return
    for rel in filter(None, listed.stdout.split("\0")):
        src = REPO / rel
        if src.is_symlink():  # src/kdpipe/pipeline and stages: copied as the links they are
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).symlink_to(os.readlink(src))
        elif src.is_file():  # deleted files are still listed as tracked
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _source_packages() -> dict[str, Path]:
    """Import name -> folder of every package (a folder with an __init__.py) in the source tree."""
    found = {}
    for folder, _dirs, files in os.walk(SOURCE_ROOT, followlinks=True):
        rel = Path(folder).relative_to(SOURCE_ROOT)
        if "__init__.py" in files and "__pycache__" not in rel.parts:
            found[".".join(("kdpipe", *rel.parts))] = Path(folder)
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, sdist, the build's stdout+stderr) built from a copy of the checkout."""
    _check_build_tools()
    work = tmp_path_factory.mktemp("packaging")
    src, dist = work / "kdpipe-src", work / "dist"
    _copy_checkout(src)
    proc = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], cwd=work)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist in {sorted(dist.iterdir())}"
    return wheels[0], sdists[0], proc.stdout + proc.stderr


def test_build_prints_no_deprecation_warnings(built):
    *_, output = built
    # The file listing ("copying pipeline/x.py ...") is not a warning whatever the files are called.
    warnings = [line for line in output.splitlines()
                if ("deprecat" in line.lower() or "SetuptoolsDeprecationWarning" in line)
                and not line.lstrip().startswith(("copying ", "adding ", "creating "))]
    assert not warnings, "python -m build printed deprecation warnings:\n" + "\n".join(warnings)


def test_wheel_holds_every_package_and_nothing_else(built):
    wheel, _, _ = built
    members = zipfile.ZipFile(wheel).namelist()
    in_wheel = {m[: -len("/__init__.py")].replace("/", ".") for m in members if m.endswith("/__init__.py")}
    source = _source_packages()
    missing = sorted(set(source) - in_wheel)
    assert not missing, (f"the wheel lacks the package(s) {', '.join(missing)} "
                         f"({', '.join(str(source[m].relative_to(REPO)) for m in missing)})")
    links = [i.filename for i in zipfile.ZipFile(wheel).infolist() if stat.S_ISLNK(i.external_attr >> 16)]
    assert not links, f"the wheel holds symlinks instead of files: {links}"
    modules = {f"{name.replace('.', '/')}/{py.name}" for name, folder in source.items() for py in folder.glob("*.py")}
    assert not sorted(modules - set(members)), f"modules missing from the wheel: {sorted(modules - set(members))}"
    assert not [m for m in members if m.split("/")[0] in ("tests", "data")], "the wheel ships tests/ or data/"
    dist_info = f"kdpipe-{PYPROJECT['project']['version']}.dist-info/"
    stray = [m for m in members if not m.startswith(("kdpipe/", dist_info))]
    assert not stray, f"the wheel holds files outside kdpipe/: {stray}"


def test_sdist_holds_real_files(built):
    _, sdist, _ = built
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
    links = [m.name for m in members if m.issym() or m.islnk()]
    assert not links, f"the sdist holds links instead of files: {links}"
    reader = [m for m in members if m.name.endswith("/src/kdpipe/pipeline/cache/reader.py")]
    assert len(reader) == 1 and reader[0].isfile(), "the sdist lacks src/kdpipe/pipeline/cache/reader.py"


def _new_venv(work: Path) -> Path:
    """A new venv without pip (the test venv's pip installs into it); returns its python."""
    root = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=work)
    return root / "bin" / "python"


def _add_test_dependencies(python: Path, work: Path) -> None:
    """Put the test venv's site-packages on the new venv's path (one plain ``.pth`` path line each)."""
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=work).stdout.strip())
    host = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    (purelib / "kdpipe_test_dependencies.pth").write_text(
        "".join(f"{p}\n" for p in dict.fromkeys(host) if Path(p).is_dir()))


@pytest.fixture(scope="module")
def fresh_venv(built, tmp_path_factory):
    """A new venv with only the wheel installed; the dependencies come from the test venv's site-packages."""
    wheel, _, _ = built
    work = tmp_path_factory.mktemp("fresh")
    python = _new_venv(work)
    # pip from the test venv, installing into the fresh one (no ensurepip: faster, and still no index).
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel],
         cwd=work)
    # Only now the dependencies: before the install pip would have found the editable kdpipe through them.
    _add_test_dependencies(python, work)
    return python.parents[1], work


def test_editable_install_is_a_path_entry_that_imports_from_the_checkouts_parent(tmp_path):
    _check_build_tools()
    checkout = tmp_path / "kdpipe"  # named as `git clone` names it
    _copy_checkout(checkout)
    python = _new_venv(tmp_path)
    # The build runs in the new venv (no isolation), so it needs setuptools from the test venv first.
    _add_test_dependencies(python, tmp_path)
    done = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                 "--no-build-isolation", "-e", checkout], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert "deprecat" not in output.lower() and "warning" not in output.lower(), output[-3000:]
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path).stdout.strip())
    hooks = sorted(p.name for p in purelib.glob("__editable__*finder*"))
    assert not hooks, f"the editable install maps kdpipe with an import hook ({hooks}), not a path entry"
    pth = [p.read_text().strip() for p in purelib.glob("__editable__*kdpipe*.pth")]
    assert pth == [str(checkout / "src")], pth
    probe = "import kdpipe; kdpipe.open_cache; print(kdpipe.__file__)"
    found = _run([python, "-c", probe], cwd=tmp_path).stdout.strip()
    assert found == str(checkout / "src" / "kdpipe" / "__init__.py"), found


def test_wheel_installs_and_runs_in_a_fresh_venv(fresh_venv):
    root, work = fresh_venv
    probe = (
        "import json, sys, importlib.metadata as md\n"
        "import kdpipe, kdpipe.pipeline.cache.reader, kdpipe.stages.cli\n"
        "files = {n: m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'kdpipe'}\n"
        "print(json.dumps({'files': files, 'version': md.version('kdpipe'), '__version__': kdpipe.__version__}))\n"
    )
    found = json.loads(_run([root / "bin" / "python", "-c", probe], cwd=work).stdout.strip().splitlines()[-1])
    fresh = root.resolve()
    elsewhere = {n: f for n, f in found["files"].items() if f is None or fresh not in Path(f).resolve().parents}
    assert not elsewhere, f"kdpipe modules not imported from the fresh venv {fresh}: {elsewhere}"
    expected = PYPROJECT["project"]["version"]
    assert found["version"] == expected
    assert found["__version__"] == expected, "kdpipe.__version__ (kdpipe/__init__.py) differs from pyproject's version"

    script = root / "bin" / "kdpipe"
    assert _run([script, "--version"], cwd=work).stdout.strip() == f"kdpipe {expected}"
    helped = _run([script, "cache-teacher", "--help"], cwd=work).stdout
    assert "Usage: kdpipe cache-teacher" in helped and "--top-k" in helped
    # The public API imports from the wheel; the demo, whose data ships only in a checkout, says so.
    _run([root / "bin" / "python", "-c", "import kdpipe; assert kdpipe.DistillationLoss and kdpipe.CacheDataset"], cwd=work)
    demo = subprocess.run([script, "demo", "--out", work / "demo"], cwd=work, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 2 and "run kdpipe demo (or make demo) from a checkout" in demo.stderr, demo.stderr
    assert demo.stderr.strip().count("\n") == 0 and "Traceback" not in demo.stderr, demo.stderr
