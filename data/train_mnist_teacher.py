"""Train the MNIST demo teacher (resnet_teacher from data/mnist_models.py).

Usage:
    python data/train_mnist_teacher.py

Trains on data/mnist/train.npz (CPU, seeded, fixed number of epochs), prints the
held-out accuracy and writes data/mnist/teacher.safetensors (state_dict including
the BatchNorm running statistics, so the model is ready for eval()).
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

DATA = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA))
from mnist_models import resnet_teacher  # noqa: E402

SEED = 0
EPOCHS = 8
BATCH = 64
LR = 3e-3


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(DATA / "mnist" / f"{split}.npz")
    return torch.from_numpy(d["x"]).float() / 255.0, torch.from_numpy(d["y"])


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    # Translate each digit by up to 2 px: cheap augmentation that matters with only
    # 4,000 training images.
    padded = F.pad(x, (max_shift,) * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, len(x)), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28] for i in range(len(x))])


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return (pred == y).float().mean().item()


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(SEED)  # data order and augmentation

    x_train, y_train = load("train")
    x_held, y_held = load("heldout")
    model = resnet_teacher()
    print(f"params {sum(p.numel() for p in model.parameters()):,}")

    steps_per_epoch = len(x_train) // BATCH  # drop the ragged last batch (keeps BN happy)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch)

    t0 = time.time()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * BATCH:(i + 1) * BATCH]
            loss = F.cross_entropy(model(random_shift(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}  loss {loss.item():.4f}  held-out acc {accuracy(model, x_held, y_held):.4f}  "
              f"{time.time() - t0:.0f}s", flush=True)

    model.eval()
    print(f"final: train acc {accuracy(model, x_train, y_train):.4f}  "
          f"held-out acc {accuracy(model, x_held, y_held):.4f}  train time {time.time() - t0:.0f}s")
    save_file(model.state_dict(), DATA / "mnist" / "teacher.safetensors")
    print(f"saved to {DATA / 'mnist' / 'teacher.safetensors'}")


if __name__ == "__main__":
    main()
