"""``import kdpipe`` works from any folder, and the source tree resolves without import hooks.

The import package is the real folder ``src/kdpipe/``; its ``pipeline`` and ``stages`` are relative
symlinks to the top-level folders. An editable install of that layout is a plain ``src/`` path entry,
so the regular package wins over the namespace portion that a checkout named ``kdpipe`` (what ``git
clone`` gives) is when Python runs from the folder above it. The older package-dir mapping needed an
import hook that ran after the normal path search and lost to that portion (issue 28).
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import PathFinder
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _python(code: str, *, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_import_from_the_parent_of_a_checkout_named_kdpipe(tmp_path):
    (tmp_path / "kdpipe").symlink_to(REPO, target_is_directory=True)  # the checkout, as `git clone` names it
    probe = ("import kdpipe, kdpipe.pipeline.cache.reader as reader\n"
             "assert kdpipe.open_cache is reader.open_cache\n"
             "print(kdpipe.__file__)\n")
    done = _python(probe, cwd=tmp_path)
    assert done.returncode == 0, (
        f"import kdpipe from {tmp_path} (which holds a checkout named kdpipe) failed:\n{done.stderr[-2000:]}\n"
        "an editable install from before the src/ layout maps kdpipe with an import hook that loses to the "
        "checkout: reinstall with pip install --no-deps --no-build-isolation -e .")
    assert Path(done.stdout.strip()).name == "__init__.py", done.stdout  # a regular package, not a namespace


def test_import_from_the_filesystem_root():
    done = _python("import kdpipe; print(kdpipe.open_cache.__module__)", cwd=Path("/"))
    assert done.returncode == 0 and done.stdout.strip() == "kdpipe.pipeline.cache.reader", done.stderr[-2000:]


def _resolve_statically(module: str) -> Path:
    """The file of ``module`` found on the source tree's ``src/`` folder by the plain path search alone
    (what static tools do): nothing is imported, no import hook is consulted."""
    search, spec = [str(SRC)], None
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        spec = PathFinder.find_spec(".".join(parts[:depth]), search)
        assert spec is not None and spec.origin, f"{'.'.join(parts[:depth])} does not resolve under {SRC}"
        search = list(spec.submodule_search_locations or [])
    return Path(spec.origin)


def test_static_resolution_of_a_library_module():
    found = _resolve_statically("kdpipe.pipeline.cache.reader")
    assert found == SRC / "kdpipe" / "pipeline" / "cache" / "reader.py"
    assert found.resolve() == REPO / "pipeline" / "cache" / "reader.py"  # the top-level folder holds the code


def test_every_module_of_the_source_tree_resolves_statically():
    unresolved = []
    for folder in ("pipeline", "stages"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if _resolve_statically(".".join(("kdpipe", *parts))).resolve() != path:
                unresolved.append(str(rel))
    assert not unresolved, f"modules that do not resolve to their file through src/kdpipe: {unresolved}"


def test_the_package_links_are_relative():
    """Relative links keep working wherever the checkout is cloned, copied or mounted."""
    for name in ("pipeline", "stages"):
        link = SRC / "kdpipe" / name
        assert link.is_symlink(), f"src/kdpipe/{name} must be a symlink to the top-level {name}/"
        assert os.readlink(link) == f"../../{name}", os.readlink(link)
