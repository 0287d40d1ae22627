"""Run by test_ddp.py as `python ddp_worker.py OUT PRECISION [per_rank] [compile] [gap] [doconv|expand]`: 2 CPU processes
(gloo), Lightning's own DDP launcher; `per_rank` turns on the callback's per_rank_noise, `compile` trains
``torch.compile(model, fullgraph=True)`` (backend aot_eager) and counts the graphs dynamo compiled after each batch,
`gap` sets the noise from the generalisation gap (form="relative", monitor="val_loss") with a validation loss that
differs between the ranks, on a model with batch norm (each rank's own statistics: SyncBatchNorm needs GPUs);
`doconv` or `expand` trains a model with a convolution first under that form (nothing drawn).

Each rank writes what it saw to OUT/rank{r}.pt: the kernel sampled at every training step, its final
parameters, how many times it wrote the small model and recomputed the batch-norm statistics.
"""

import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import ConvModule, NormModule, TinyModule, loader, tear_down_together, trainer  # noqa: E402

from lightning_mk import MajorityKernelCallback, NormStatistics  # noqa: E402

out = sys.argv[1]
per_rank, compiled, gap = ("per_rank" in sys.argv[3:], "compile" in sys.argv[3:], "gap" in sys.argv[3:])
reparametrised = next((form for form in ("doconv", "expand") if form in sys.argv[3:]), None)
writes = []
_save = torch.save


def counting_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "net.0.weight" in obj:
        writes.append(1)
    return _save(obj, f, *args, **kwargs)


torch.save = counting_save
recalibrations = []
_recalibrate = NormStatistics.recalibrate
NormStatistics.recalibrate = lambda self: recalibrations.append(len(self.inputs)) or _recalibrate(self)


class Recording(NormModule if gap else ConvModule if reparametrised else TinyModule):
    def __init__(self):
        super().__init__()
        self.sampled = []

    def on_before_backward(self, loss):
        self.sampled.append(self.net[0].weight.detach().clone())  # this step's draw (train mode), read eagerly

    def training_step(self, batch, batch_idx):
        x, y = batch  # no self.log: under DDP Lightning compiles training_step, and dynamo cannot trace log()
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch  # each rank its own value (no sync_dist): the callback must still set one level everywhere
        self.log("val_loss", F.cross_entropy(self(x), y) + 10.0 * (1 + self.global_rank))


class CountFrames(pl.Callback):
    def __init__(self):
        self.frames = []

    def on_train_batch_end(self, *args):
        from torch._dynamo.utils import counters

        assert not counters["graph_break"], dict(counters["graph_break"])
        self.frames.append(counters["stats"]["unique_graphs"])  # graphs compiled so far, recompilations included


pl.seed_everything(0)
model = Recording()
precision = sys.argv[2]
options = dict(form="relative", monitor="val_loss", noise=0.3, norm_batches=8) if gap else dict(form=reparametrised) if reparametrised else {}
cb = MajorityKernelCallback.published(k=4, scheme="select", seed=3, per_rank_noise=per_rank, save_path=os.path.join(out, "small.pt"), **options)
frames = CountFrames()
trainer = trainer(out, devices=2, strategy="ddp", precision=precision, max_epochs=2, callbacks=[cb, frames])
trainer.fit(
    torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model,
    loader(n=64, batch_size=8),
    loader(n=16, batch_size=8, seed=1 + trainer.global_rank) if gap else None,
)
torch.save = _save
params = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
level = cb.control.state_dict() if gap else None
torch.save({"sampled": model.sampled, "params": params, "writes": len(writes), "frames": frames.frames, "level": level,
            "recalibrations": recalibrations},
           os.path.join(out, f"rank{trainer.global_rank}.pt"))
tear_down_together()
