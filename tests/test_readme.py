"""The README's shell blocks work when pasted.

- Every shell block is checked statically: no line continuation (``\\``) that a comment swallows.
- The blocks marked ``<!-- test: run -->`` (the line before the opening fence) are run with bash, in
  README order, in one scratch folder that links the checkout's ``data/`` and the running venv as
  ``.venv``, with that venv's ``bin`` first on PATH. The placeholders the README uses for a user's own
  files (``/models/Qwen2.5-1.5B``, ``corpus/``, ``/caches/...``) become the shipped demo teacher and
  plays, and sizes become small ones (:data:`SMALL`), so the whole run takes about a minute on CPU.

Blocks that need a GPU, an object store, several machines or Docker stay unmarked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = "<!-- test: run -->"
SHELL_LANGS = {"bash", "sh", "shell", "console"}

# The README's stand-ins for a user's files -> the shipped demo data (paths relative to the scratch folder).
PLACEHOLDERS = {
    "/models/Qwen2.5-1.5B": "data/teacher",
    "corpus/": "data/shakespeare/train/",
    "heldout/": "data/shakespeare/heldout/",
    "student-config.json": "data/students/lm-student.json",
    "/caches/": "caches/",
}
# Small settings: (regex, replacement), applied in order to every marked block.
SMALL = [
    (r"--seq-len \d+", "--seq-len 64"),
    (r"--steps \d+", "--steps 2"),
    (r"--batch-size \d+", "--batch-size 4"),
    (r"--warmup \d+", "--warmup 1"),
    (r"--device cuda\b", "--device cpu"),
    # 8 rows from the first small data block, tokenised in this process (no worker start-up)
    (r"\bkdpipe cache-teacher ", "kdpipe cache-teacher --limit-rows 8 --block-mb 0.05 --num-workers 0 "),
]


def shell_blocks(text: str) -> list[tuple[int, bool, str]]:
    """``(line number of the opening fence, marked for running, body)`` of each shell code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+)\s*(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence.group(2))), len(lines))
        if fence.group(3).lower() in SHELL_LANGS:
            marked = i > 0 and lines[i - 1].strip() == MARKER
            blocks.append((i + 1, marked, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return blocks


def _comment_start(line: str) -> int | None:
    """Index of the ``#`` that starts a shell comment on ``line`` (outside quotes, at a word start)."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return None


def swallowed_continuations(block: str) -> list[str]:
    """Lines where a comment ends a command that a ``\\`` meant to continue."""
    bad, continued = [], False
    for line in block.splitlines():
        start = _comment_start(line)
        code = line if start is None else line[:start]
        if start is not None and (code.rstrip().endswith("\\") or line.rstrip().endswith("\\")
                                  or (continued and not code.strip())):
            bad.append(line)
        continued = start is None and line.rstrip().endswith("\\")
    return bad


def runnable(block: str) -> str:
    pattern = "|".join(re.escape(p) for p in sorted(PLACEHOLDERS, key=len, reverse=True))
    block = re.sub(rf"(?<![\w./-])(?:{pattern})", lambda m: PLACEHOLDERS[m.group(0)], block)
    for regex, small in SMALL:
        block = re.sub(regex, small, block)
    return block


def test_the_checker_finds_a_comment_after_a_continuation():
    broken = "kdpipe cache-teacher \\\n  --teacher x \\        # a comment\n  --data y"
    assert swallowed_continuations(broken) == ["  --teacher x \\        # a comment"]
    assert swallowed_continuations("a \\\n# comment\n  b") == ["# comment"]
    assert swallowed_continuations("a # comment \\\nb") == ["a # comment \\"]
    fine = 'a --schedule "0:T=4;#x" \\\n  b   # a comment\nc \'#\' d \\\n  e'
    assert swallowed_continuations(fine) == []


def test_no_shell_block_continues_into_a_comment():
    bad = {line: body for line, _, body in shell_blocks(README.read_text()) if swallowed_continuations(body)}
    assert not bad, "README shell blocks whose `\\` continuation is ended by a comment (fence line: lines): " + \
        "; ".join(f"{line}: {swallowed_continuations(body)}" for line, body in bad.items())


def test_the_marked_blocks_are_the_ones_a_user_runs_first():
    marked = [body for _, run, body in shell_blocks(README.read_text()) if run]
    assert any("source .venv/bin/activate" in b for b in marked)
    assert any("/models/Qwen2.5-1.5B" in b and "kdpipe verify" in b for b in marked)
    assert any("kdpipe train-student" in b and "kdpipe evaluate" in b for b in marked)
    for body in marked:  # every stand-in is replaced: nothing outside the scratch folder is touched
        assert "/caches/" not in runnable(body) and "/models/" not in runnable(body)


@pytest.mark.slow
def test_marked_blocks_run_on_the_demo_data(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"the tests run outside a venv ({sys.prefix}); the README's blocks activate one")
    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / ".venv").symlink_to(venv)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    blocks = [(line, runnable(body)) for line, run, body in shell_blocks(README.read_text()) if run]
    assert blocks
    for line, script in blocks:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (
            f"README block at line {line} failed (exit {done.returncode}) as run:\n{script}\n"
            f"--- stdout (end)\n{done.stdout[-3000:]}\n--- stderr (end)\n{done.stderr[-3000:]}")
    assert (tmp_path / "runs" / "s1" / "model").is_dir()
    assert (tmp_path / "caches" / "qwen-k64" / "manifest.json").is_file()
