"""Run by sharded.py as `python sharded_worker.py OUT STRATEGY PRECISION ACCELERATOR DEVICES [compile]`,
STRATEGY one of fsdp, fsdp_wrap_linear (each Linear its own FSDP unit), deepspeed_stage_2,
deepspeed_stage_3 (`compile`: fit ``torch.compile(model)``, backend aot_eager): DEVICES processes train a
model whose layers are built in
configure_model, with MajorityKernelCallback, for 2 epochs; save a sharded checkpoint; resume from it
for a third epoch and save again.

Each rank writes OUT/rank{r}.pt: the kernel it sampled at every training step, the callback's step
count after each fit, the copy spread it logged, how much of the copies it holds outside a forward
pass, and how many frames dynamo had compiled after each batch of the first fit.

On the CPU two shims let Lightning run strategies it reserves for GPUs; the callback, Lightning's
strategies and PyTorch's FSDP / DeepSpeed run unchanged otherwise:
- FSDP: Lightning refuses an FSDPStrategy on the CPU (its check looks at the exact type, so a subclass
  passes) and hands FSDP ``device_id=None``, with which FSDP looks for a GPU; given ``device_id=cpu``
  it runs on gloo. Lightning's "full" checkpoints offload to the CPU, which crashes when the
  parameters are already there: these runs save "sharded" checkpoints.
- DeepSpeed: Lightning's ``setup_environment`` refuses a non-CUDA accelerator (that check is skipped)
  and wants device indices that match the local ranks (given). DeepSpeed runs on its CPU accelerator
  (``DS_ACCELERATOR=cpu``); told that no compiled op is available, it communicates through gloo
  instead of compiling a shared-memory all-reduce with the machine's C++ compiler (~45 s, or a failure
  where there is none).
"""

import os
import sys

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import TinyModule, loader, tear_down_together, trainer  # noqa: E402

import lightning_mk.callback  # noqa: E402
from lightning_mk import MajorityKernelCallback, kernel_copies  # noqa: E402

out, name, precision, accelerator, devices = sys.argv[1:5] + [int(sys.argv[5])]
compiled = sys.argv[6:] == ["compile"]
on_cpu = accelerator == "cpu"

if on_cpu and name.startswith("fsdp"):
    import torch.distributed.fsdp as fsdp

    class CPUFullyShardedDataParallel(fsdp.FullyShardedDataParallel):
        def __init__(self, *args, device_id=None, **kwargs):
            super().__init__(*args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)

    fsdp.FullyShardedDataParallel = CPUFullyShardedDataParallel  # what Lightning's FSDPStrategy imports

    class CPUFSDPStrategy(FSDPStrategy):
        """Passes Lightning's "FSDP needs a GPU" check, which looks at the exact type."""


if on_cpu and name.startswith("deepspeed"):
    import deepspeed.ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)


full_states = []  # one per whole-model gather: the small model's, at the end of each fit (not the spread's)
gather = lightning_mk.callback._full_state
lightning_mk.callback._full_state = lambda strategy: full_states.append(strategy) or gather(strategy)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self):
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own adds only the CUDA check


def make_strategy():
    if name.startswith("fsdp"):
        wrap = {"auto_wrap_policy": {nn.Linear}} if name == "fsdp_wrap_linear" else {}
        return (CPUFSDPStrategy if on_cpu else FSDPStrategy)(state_dict_type="sharded", **wrap)
    stage = int(name.removeprefix("deepspeed_stage_"))
    if on_cpu:
        return CPUDeepSpeedStrategy(stage=stage, parallel_devices=[torch.device("cpu", i) for i in range(devices)])
    return DeepSpeedStrategy(stage=stage)


class BuiltLate(TinyModule):
    """Layers built in configure_model, as FSDP and DeepSpeed users do; records every sampled kernel."""

    def __init__(self):
        super().__init__()
        self.net = None
        self.sampled = []
        self.frames = []

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
            self.net[0].register_forward_hook(self.record)

    def training_step(self, batch, batch_idx):
        x, y = batch  # no self.log: Lightning compiles training_step itself, and dynamo cannot trace log()
        return F.cross_entropy(self(x), y)

    def on_train_batch_end(self, *args):
        from torch._dynamo.utils import counters

        self.frames.append(counters["frames"]["total"])  # recompilations included

    def record(self, layer, args, output):
        """Inside the layer's call, where every strategy has its parameters whole."""
        if self.training:
            self.sampled.append(layer.weight.detach().float().cpu().clone())


def fit(max_epochs, save_as, ckpt_path=None):
    model = BuiltLate()
    # init_noise: the copies differ from the start, so each step's draw differs even where a 16-bit run's
    # loss scaler skips the first updates
    cb = MajorityKernelCallback.published(k=4, scheme="select", seed=3, init_noise=0.1, save_path=os.path.join(out, save_as + ".pt"))
    t = trainer(out, accelerator=accelerator, devices=devices, strategy=make_strategy(), precision=precision,
                max_epochs=max_epochs, callbacks=[cb])
    t.fit(torch.compile(model, backend="aot_eager") if compiled else model, loader(n=64, batch_size=8), ckpt_path=ckpt_path)
    t.save_checkpoint(os.path.join(out, save_as + ".ckpt"))
    return t, model, cb


t, model, cb = fit(2, "first")
copies = kernel_copies(model)["net.0.weight"]
held = copies.ds_tensor.numel() if hasattr(copies, "ds_tensor") else copies.numel()  # ZeRO-3 keeps a partition
t2, resumed, cb2 = fit(3, "resumed", ckpt_path=os.path.join(out, "first.ckpt"))
torch.save(
    {"sampled": model.sampled, "resumed_sampled": resumed.sampled, "steps": [cb.kernels.step, cb2.kernels.step],
     "held": held, "spread": t.callback_metrics["mk/spread"].item(), "frames": model.frames, "gathers": len(full_states)},
    os.path.join(out, f"rank{t.global_rank}.pt"),
)
tear_down_together()
