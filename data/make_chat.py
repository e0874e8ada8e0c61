"""Build the small chat set in data/chat/ from the shipped Shakespeare plays.

Usage (from the repository root):  python data/make_chat.py

Writes data/chat/train.jsonl (600 conversations from the 10 training plays) and
data/chat/heldout.jsonl (100 from the held-out play), one {"messages": [...]} record a line.
Each conversation quotes one or two consecutive speeches of a play; the user asks either for
the next speech or for who speaks next, and the assistant answers with the play's own text.
About 28% have a system message and a second round ("And after that?" / "What do they
say?"). Seeded (random.Random(0)) and byte-identical on every run; standard library only.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path

DATA = Path(__file__).resolve().parent
PLAYS = DATA / "shakespeare"
OUT = DATA / "chat"
PER_TRAIN_PLAY, N_HELDOUT = 60, 100
MAX_SPEECH_CHARS, MAX_CHARS = 200, 400  # per speech, per conversation: well under 256 tokens
TITLES = {
    "as_you_like_it": "As You Like It", "hamlet": "Hamlet", "julius_caesar": "Julius Caesar",
    "lear": "King Lear", "macbeth": "Macbeth", "merchant_of_venice": "The Merchant of Venice",
    "midsummer_nights_dream": "A Midsummer Night's Dream", "othello": "Othello",
    "richard_iii": "King Richard III", "romeo_and_juliet": "Romeo and Juliet",
    "twelfth_night": "Twelfth Night",
}
SYSTEM = "You know Shakespeare's plays by heart. Answer with the play's own words, nothing else."


def speeches(text: str) -> list[tuple[int, str, str]]:
    """(block index, speaker heading, speech) in play order, from "ACT I" on.

    Blocks are separated by blank lines; a speech block is a short heading line ("Hor.", "SIR TOBY.",
    "THESEUS") and the lines spoken. A heading must recur (at least 3 speech blocks) so that a
    continuation after a stage direction is not taken for one.
    """
    body = text[re.search(r"^ACT (I|1)\.$", text, re.M).start():]
    blocks = [b.strip("\n").partition("\n") for b in body.split("\n\n")]
    heading = re.compile(r"[A-Z][A-Za-z' ]{0,28}\.?")
    candidates = [(i, h, "\n".join(line.strip() for line in s.split("\n")))  # drop verse indents
                  for i, (h, _, s) in enumerate(blocks) if s and heading.fullmatch(h)]
    counts = Counter(h for _, h, _ in candidates)
    return [(i, h, s) for i, h, s in candidates if counts[h] >= 3]


def quote(run: list[tuple[int, str, str]]) -> str:
    return "\n\n".join(f"{heading}\n{speech}" for _, heading, speech in run)


def conversation(play: str, parts: list[tuple[int, str, str]], at: int, rng: random.Random) -> dict:
    """One conversation about the four speeches from ``parts[at]`` (adjacent and short)."""
    n_quoted = rng.choice((1, 2))
    passage, following, then = parts[at : at + n_quoted], parts[at + n_quoted], parts[at + n_quoted + 1]
    if rng.random() < 0.5:
        rounds = [(f"Continue this scene from {play}:\n\n{quote(passage)}", quote([following])),
                  ("And after that?", quote([then]))]
    else:
        rounds = [(f"Who speaks next in {play}, after these lines?\n\n{quote(passage)}", following[1]),
                  ("What do they say?", following[2])]
    if rng.random() < 2 / 3:
        rounds, system = rounds[:1], []
    else:
        system = [{"role": "system", "content": SYSTEM}]
    turns = [{"role": role, "content": text} for ask, answer in rounds
             for role, text in (("user", ask), ("assistant", answer))]
    return {"messages": system + turns}


def play_conversations(path: Path, n: int, rng: random.Random) -> list[dict]:
    """``n`` conversations from one play, in play order."""
    parts = speeches(path.read_text(encoding="utf-8"))
    # Start where the next four speeches are adjacent blocks (nothing skipped between them) and
    # all short, so any record kind fits.
    starts = [i for i in range(len(parts) - 3)
              if parts[i + 3][0] - parts[i][0] == 3
              and all(len(s) <= MAX_SPEECH_CHARS for _, _, s in parts[i : i + 4])]
    rng.shuffle(starts)
    chosen = []
    for at in starts:
        record = conversation(TITLES[path.stem], parts, at, rng)
        if sum(len(m["content"]) for m in record["messages"]) <= MAX_CHARS:
            chosen.append((at, record))
        if len(chosen) == n:
            return [record for _, record in sorted(chosen, key=lambda c: c[0])]
    raise SystemExit(f"{path}: only {len(chosen)} conversations fit in {MAX_CHARS} characters")


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    rng = random.Random(0)
    train = [c for p in sorted((PLAYS / "train").glob("*.txt"))
             for c in play_conversations(p, PER_TRAIN_PLAY, rng)]
    heldout = [c for p in sorted((PLAYS / "heldout").glob("*.txt"))
               for c in play_conversations(p, N_HELDOUT, rng)]
    rng.shuffle(train)
    OUT.mkdir(exist_ok=True)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out conversations to {OUT}")


if __name__ == "__main__":
    main()
