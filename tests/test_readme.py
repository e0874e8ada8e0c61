"""The shell blocks of the README and docs/*.md work when pasted.

- Every shell block is checked statically: no line continuation (``\\``) that a comment swallows.
- The blocks marked ``<!-- test: run -->`` (the line before the opening fence) are run with bash, in
  order (the README's, then each docs/*.md page's, pages sorted by name), in one scratch folder that
  links the checkout's ``data/`` and the running venv as ``.venv``, with that venv's ``bin`` first on
  PATH. The placeholders the docs use for a user's own files (``/models/Qwen2.5-1.5B``, ``corpus/``,
  ``/caches/...``) become the shipped demo teacher and plays, and sizes become small ones
  (:data:`SMALL`), so the whole run takes a few minutes on CPU.

Blocks that need a GPU, an object store, several machines or Docker stay unmarked; the README's
local S3 recipe (a moto server on localhost) is run by its own test, on a free port.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]  # the order the marked blocks run in
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


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_shell_block_continues_into_a_comment(doc):
    bad = {line: body for line, _, body in shell_blocks(doc.read_text()) if swallowed_continuations(body)}
    assert not bad, f"{doc.name} shell blocks whose `\\` continuation is ended by a comment (fence line: lines): " + \
        "; ".join(f"{line}: {swallowed_continuations(body)}" for line, body in bad.items())


def test_the_marked_blocks_are_the_ones_a_user_runs_first():
    marked = [body for _, run, body in shell_blocks(README.read_text()) if run]
    assert any("source .venv/bin/activate" in b for b in marked)
    assert any("/models/Qwen2.5-1.5B" in b and "kdpipe verify" in b for b in marked)
    assert any("kdpipe train-student" in b and "kdpipe evaluate" in b for b in marked)
    docs = [body for doc in DOCS[1:] for _, run, body in shell_blocks(doc.read_text()) if run]
    assert any("data/chat/train.jsonl" in b for b in docs)  # docs/capture.md's chat example
    assert any("kdpipe reproduce" in b for b in docs)       # docs/reproducing.md
    for body in marked + docs:  # every stand-in is replaced: nothing outside the scratch folder is touched
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
    blocks = [(doc.name, line, runnable(body)) for doc in DOCS for line, run, body in shell_blocks(doc.read_text())
              if run]
    assert blocks
    for doc, line, script in blocks:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (
            f"{doc} block at line {line} failed (exit {done.returncode}) as run:\n{script}\n"
            f"--- stdout (end)\n{done.stdout[-3000:]}\n--- stderr (end)\n{done.stderr[-3000:]}")
    assert (tmp_path / "runs" / "s1" / "model").is_dir()
    assert (tmp_path / "caches" / "qwen" / "manifest.json").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scratch_env(tmp_path: Path) -> dict:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"the tests run outside a venv ({sys.prefix}); the README's blocks activate one")
    (tmp_path / "data").symlink_to(REPO / "data")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


@pytest.mark.slow
def test_the_local_s3_recipe_runs(tmp_path):
    """The README's "try it on one machine" block: moto's server, a bucket, capture, verify, train from s3://."""
    recipe = [body for _, _, body in shell_blocks(README.read_text()) if "moto_server" in body]
    assert len(recipe) == 1
    port = str(_free_port())
    script = runnable(recipe[0]).replace("5000", port).replace("/tmp/", f"{tmp_path}/")
    # the server is a job of this shell: stopped however the script ends
    script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=_scratch_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"as run:\n{script}\n--- stderr (end)\n{done.stderr[-3000:]}"
    assert "OK s3://kd-caches/demo-k64" in done.stdout
    assert (tmp_path / "runs" / "s3-student" / "model").is_dir()
    assert any((tmp_path / "kdpipe-shards").iterdir())  # --local-cache kept the downloaded shard
