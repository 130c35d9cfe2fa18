"""A tiny training run used by the trainer tests (run as a script, also under torchrun).

Usage: python toy_run.py OUT_DIR EPOCHS [--die-at-step K] [--init-from CKPT] [--lr LR]
"""

import os
import sys
import time

import torch
from torch import nn

from dao.train import TrainConfig, Trainer


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, batch):
        x, y = batch
        return {"loss": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}


class Data:
    def __init__(self, n=100):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, k):
        return self.x[k], self.y[k]


def collate(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def main():
    out, epochs = sys.argv[1], int(sys.argv[2])
    die = int(sys.argv[sys.argv.index("--die-at-step") + 1]) if "--die-at-step" in sys.argv else -1
    torch.manual_seed(0)
    init = sys.argv[sys.argv.index("--init-from") + 1] if "--init-from" in sys.argv else None
    lr = float(sys.argv[sys.argv.index("--lr") + 1]) if "--lr" in sys.argv else 1e-2
    cfg = TrainConfig(
        init_from=init,
        epochs=epochs,
        batch_size=8,
        lr=lr,
        warmup_steps=3,
        ckpt_every_steps=5,
        log_every_steps=1,
        ema_decay=0.9,
    )
    tr = Trainer(Toy(), cfg, Data(), Data(20), collate, out, progress=False)
    if die >= 0:
        # Simulate a hard kill: os._exit right after a given optimiser step.
        orig = tr.ema.update

        def update(module, step):
            orig(module, step)
            if step + 1 == die:
                os._exit(9)

        tr.ema.update = update
    summary = tr.fit()
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {"summary": summary, "w": tr.module.state_dict()}, os.path.join(out, f"final_rank{rank}.pt")
    )
    time.sleep(0.1)


if __name__ == "__main__":
    main()
