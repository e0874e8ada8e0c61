"""Every table of measured numbers in README.md and docs/*.md is what ``benchmarks/tables.py`` renders
from ``benchmarks/results/*.json``: a number in the docs cannot drift from its measurement."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "tables.py"


def load_tables():
    spec = importlib.util.spec_from_file_location("doc_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = load_tables()
DOCS = tables.doc_paths()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_table_marker_names_a_known_table_and_is_closed(doc):
    assert tables.unknown_tables(doc.read_text()) == [], f"known tables: {sorted(tables.TABLES)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_the_docs_tables_are_the_ones_rendered_from_the_json(doc):
    text = doc.read_text()
    for marked in tables.MARKED.finditer(text):
        assert marked["body"] == tables.TABLES[marked["name"]](), (
            f"{doc.relative_to(REPO)}: table {marked['name']} differs from benchmarks/results; "
            "run python benchmarks/tables.py")


def test_every_table_appears_in_the_docs():
    used = {m["name"] for doc in DOCS for m in tables.MARKED.finditer(doc.read_text())}
    assert used == set(tables.TABLES), f"rendered but in no doc: {sorted(set(tables.TABLES) - used)}"


def test_a_changed_number_is_found_and_rendered_back():
    text = next(doc.read_text() for doc in DOCS if "<!-- table: k-sweep -->" in doc.read_text())
    table = tables.TABLES["k-sweep"]()
    drifted_table = table.replace("0.483 ± 0.009", "0.480 ± 0.009")
    assert drifted_table != table
    drifted = text.replace(table, drifted_table)
    assert tables.rendered(drifted) == text
    differing = [m["name"] for m in tables.MARKED.finditer(drifted) if m["body"] != tables.TABLES[m["name"]]()]
    assert differing == ["k-sweep"]


def test_an_unknown_or_unclosed_marker_is_reported():
    assert tables.unknown_tables("<!-- table: no-such -->\n| a |\n<!-- end table -->\n") == ["no-such"]
    assert tables.unknown_tables("<!-- table: k-sweep -->\n| a |\n") == ["k-sweep"]


def test_the_check_command_passes_on_the_checkout():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve():
    """A link to a moved section would otherwise go nowhere without anyone noticing."""
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", linked.read_text(), flags=re.S), re.M)
                if anchor not in {github_anchor(h) for h in headings}:
                    broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_no_table_shows_a_path_of_the_machine_that_measured_it():
    """The kill soak's messages name its temporary run folder; the docs show ``RUN`` instead."""
    leaked = {name: render() for name, render in tables.TABLES.items() if re.search(r"/tmp/|/home/", render())}
    assert not leaked, sorted(leaked)


def test_the_classification_demo_means_are_those_of_its_per_seed_numbers():
    """The table's mean ± sd (sd over n - 1) is what the per-seed accuracies in the same JSON give."""
    import statistics

    gain = tables._classification_run()["accuracy_gain"]
    table = tables.TABLES["classification-demo"]()
    for label, student in (("kd student", "kd"), ("hard-label student", "hard")):
        per_seed = gain[student]["per_seed"]
        mean, sd = 100 * statistics.mean(per_seed), 100 * statistics.stdev(per_seed)
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert row.split(" | ")[1] == f"{mean:.2f} ± {sd:.2f} %"


def test_the_demo_page_quotes_the_measured_gain():
    """The numbers docs/demo.md states in words are the rendered ones, so a re-measured demo cannot
    leave its prose behind."""
    text = " ".join((REPO / "docs" / "demo.md").read_text().split())
    gain = tables._classification_run()["accuracy_gain"]
    measured = (f"{tables.points(gain['mean'], gain['sd'])} accuracy points "
                f"(KD {tables.pct(gain['kd']['mean'], gain['kd']['sd'])} against hard labels "
                f"{tables.pct(gain['hard']['mean'], gain['hard']['sd'])})")
    assert measured in text, measured
