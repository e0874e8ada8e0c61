"""The library's floors (README "Code layout"): a module imports only from its own floor or the ones below."""

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
# Lowest first, as the README lists them.
FLOORS = [
    {"errors", "fileio", "provenance", "distributed"},
    {"models"},
    {"cache"},
    {"data"},
    {"capture"},
    {"train"},
    {"evaluate"},
    {"reproduce", "demo"},
    {"integrations"},
]


def floor_of(top: str) -> int:
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(f"pipeline.{top} is on no floor: add it to FLOORS here and to the README's table")


def pipeline_imports(path: Path):
    """(line, top-level name under kdpipe.pipeline) of every import of the library in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[:2] == ["kdpipe", "pipeline"]:
                tops = [parts[2]] if len(parts) > 2 else [alias.name for alias in node.names]
                yield from ((node.lineno, top) for top in tops)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write kdpipe.pipeline.... in full")


def test_every_import_points_to_the_same_floor_or_below():
    upward = []
    for path in sorted(PIPELINE.rglob("*.py")):
        rel = path.relative_to(PIPELINE)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        mine = floor_of(rel.parts[0].removesuffix(".py"))
        for line, top in pipeline_imports(path):
            if floor_of(top) > mine:
                upward.append(f"pipeline/{rel}:{line} imports pipeline.{top}")
    assert not upward, "imports from a higher floor:\n" + "\n".join(upward)


def test_the_readme_lists_every_floor():
    readme = (PIPELINE.parent / "README.md").read_text()
    table = readme[readme.index("## Code layout"):readme.index("## Running the tests")]
    on_disk = {p.name.removesuffix(".py") for p in PIPELINE.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert on_disk == set().union(*FLOORS)
    for name in on_disk:
        assert f"`{name}/`" in table or f"`{name}.py`" in table, f"README's Code layout misses pipeline/{name}"
