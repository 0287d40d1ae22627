"""Run by test_ddp.py as `python ddp_worker.py OUT PRECISION [per_rank]`: 2 CPU processes (gloo),
Lightning's own DDP launcher; `per_rank` turns on the callback's per_rank_noise.

Each rank writes what it saw to OUT/rank{r}.pt: the kernel sampled at every training step, its final
parameters, and how many times it wrote the small model.
"""

import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import TinyModule, loader, trainer  # noqa: E402

from lightning_mk import MajorityKernelCallback  # noqa: E402

out = sys.argv[1]
writes = []
_save = torch.save


def counting_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "net.0.weight" in obj:
        writes.append(1)
    return _save(obj, f, *args, **kwargs)


torch.save = counting_save


class Recording(TinyModule):
    def __init__(self):
        super().__init__()
        self.sampled = []

    def training_step(self, batch, batch_idx):
        self.sampled.append(self.net[0].weight.detach().clone())  # this step's draw (train mode)
        return super().training_step(batch, batch_idx)


pl.seed_everything(0)
model = Recording()
precision = sys.argv[2]
per_rank = sys.argv[3:] == ["per_rank"]
cb = MajorityKernelCallback(k=4, scheme="select", seed=3, per_rank_noise=per_rank, save_path=os.path.join(out, "small.pt"))
trainer = trainer(out, devices=2, strategy="ddp", precision=precision, max_epochs=2, callbacks=[cb])
trainer.fit(model, loader(n=64, batch_size=8))
torch.save = _save
params = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
torch.save({"sampled": model.sampled, "params": params, "writes": len(writes)}, os.path.join(out, f"rank{trainer.global_rank}.pt"))
