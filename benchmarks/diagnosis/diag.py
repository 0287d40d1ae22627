"""Why do Majority Kernels underfit? One training run with per-epoch diagnostics.

Methods
  plain : the plain model.
  mk    : lightning_mk.apply_majority_kernels (copies [k, *S], sampled kernel in train mode, mean in eval).
  dec   : prototype "decoupled" parametrization (this file only): kernel = mu + sum_i a_i (delta_i - mean(delta)),
          mu [*S] gets the plain gradient (taken at the sampled kernel), the deltas [k, *S] (init 0) their
          sampled gradient (a_i - 1/k) G, plus an optional elastic pull ``--pull`` (extra L2 on the deltas).
          Eval / deploy: mu.

Per epoch it records: train accuracy of the sampled model (train mode, one fresh draw per batch) and of the
mean (eval mode); test accuracy (eval mode); the copies' spread (RMS(copies - mean) / RMS(mean), averaged
over kernels); the noise of a sampled kernel, ||W_sampled - mean|| / ||mean|| (global over kernels); the
mean's displacement over the epoch and its per-step path, relative to ||mean||; the RMS per-step element
move of the mean divided by the learning rate; the gradient on the mean ||g_mean|| and the weight-decay
term wd_eff * ||mean|| acting on it (wd_eff = the decay rate the mean sees).

Run: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/diagnosis/diag.py --model cnn --method mk ...
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as diag_data  # noqa: E402

from lightning_mk import apply_majority_kernels, kernel_copies  # noqa: E402
from lightning_mk.parametrization import Draws  # noqa: E402
from lightning_mk.settings import Settings  # noqa: E402
from lightning_mk.schemes import Random, get_scheme  # noqa: E402

torch.set_num_threads(1)

KERNEL_TYPES = (nn.Linear, nn.Conv1d)


class CNN(nn.Module):
    """Three Conv1d + a linear head, ReLU, no normalisation."""

    def __init__(self, channels: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, channels, 5, padding=2)
        self.c2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.c3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.head = nn.Linear(channels * 10, num_classes)

    def forward(self, x):
        x = x.unsqueeze(1)
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.head(x.flatten(1))


def build(model: str, n: int):
    if model == "cnn":
        return CNN()
    from lightning_mk.experiments.models import MLP

    return MLP((40,), 10, n=n, depth=2)


# --------------------------------------------------------------------------------------- decoupled prototype
class Decoupled:
    """Forward pre-hook: the layer's ``weight`` = mu (+ a centred sampled deviation in train mode)."""

    def __init__(self, layer: nn.Module, k: int, scheme: str, index: int, seed: int) -> None:
        w = layer.weight.detach().clone()
        del layer._parameters["weight"]
        layer.mu = nn.Parameter(w)
        layer.delta = nn.Parameter(torch.zeros(k, *w.shape))
        self.scheme, self.index, self.seed, self.step = get_scheme(scheme), index, seed, 0
        layer.weight = w  # plain attribute, replaced before every forward
        layer.register_forward_pre_hook(self)

    def deviation(self, layer, random):
        d = layer.delta - layer.delta.mean(0, keepdim=True)
        return self.scheme.combine(d, random)

    def __call__(self, layer, args):
        if layer.training:
            self.step += 1
            key = Draws(Settings(seed=self.seed)).key(self.index)  # as the library keys a kernel's draws
            layer.weight = layer.mu + self.deviation(layer, Random(key, Random.state_of(torch.tensor(self.step))))
        else:
            layer.weight = layer.mu.view_as(layer.mu)  # a Tensor, not the Parameter (which would register)


def apply_decoupled(model: nn.Module, k: int, scheme: str, seed: int) -> list[nn.Module]:
    layers = [m for m in model.modules() if isinstance(m, KERNEL_TYPES)]
    for i, m in enumerate(layers):
        Decoupled(m, k, scheme, i, seed)
    return layers


# --------------------------------------------------------------------------------------------- diagnostics
class View:
    """Uniform access to the 'kernel' of each layer: its mean, the gradient on the mean, the spread of the
    copies and a sampled kernel's deviation from the mean."""

    def __init__(self, model, method, k, scheme, plain_weights=None, dec_layers=None):
        self.model, self.method, self.k, self.scheme = model, method, k, get_scheme(scheme) if scheme else None
        if method == "plain":
            self.weights = plain_weights
        elif method == "mk":
            self.copies = list(kernel_copies(model).values())
        else:
            self.layers = dec_layers

    @torch.no_grad()
    def means(self):
        if self.method == "plain":
            return [w.detach().clone() for w in self.weights]
        if self.method == "mk":
            return [c.detach().mean(0) for c in self.copies]
        return [m.mu.detach().clone() for m in self.layers]

    @torch.no_grad()
    def mean_grads(self):
        if self.method == "plain":
            return [w.grad for w in self.weights]
        if self.method == "mk":
            return [c.grad.mean(0) for c in self.copies]
        return [m.mu.grad for m in self.layers]

    @torch.no_grad()
    def spread_and_noise(self, draws=4):
        if self.method == "plain":
            return 0.0, 0.0, 0.0
        spreads, noise2, mean2 = [], 0.0, 0.0
        items = self.copies if self.method == "mk" else [m for m in self.layers]
        for it in items:
            if self.method == "mk":
                mean = it.detach().mean(0)
                dev = it.detach() - mean
            else:
                mean = it.mu.detach()
                dev = it.delta.detach() - it.delta.detach().mean(0, keepdim=True)
            spreads.append((dev.pow(2).mean().sqrt() / mean.pow(2).mean().sqrt()).item())
            for step in range(draws):
                noise2 += self.scheme.combine(dev, Random(12345, Random.state_of(torch.tensor(step)))).pow(2).sum().item() / draws
            mean2 += mean.pow(2).sum().item()
        return sum(spreads) / len(spreads), max(spreads), math.sqrt(noise2 / mean2)


@torch.no_grad()
def accuracy(model, x, y, train_mode: bool, bs: int = 1000):
    model.train(train_mode)
    correct, loss = 0, 0.0
    for i in range(0, len(x), bs):
        out = model(x[i : i + bs])
        correct += (out.argmax(1) == y[i : i + bs]).sum().item()
        loss += F.cross_entropy(out, y[i : i + bs], reduction="sum").item()
    model.train()
    return 100.0 * correct / len(x), loss / len(x)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    p.add_argument("--n", type=int, default=128, help="MLP width")
    p.add_argument("--samples", type=int, default=5000, help="MNIST-1D num_samples (80 %% train)")
    p.add_argument("--method", choices=["plain", "mk", "dec"], default="plain")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--scheme", default="select")
    p.add_argument("--grad-scale", default="none", help="mk only: lightning_mk grad_scale")
    p.add_argument("--opt", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=0.0, help="weight decay (coupled, torch's weight_decay) on all parameters")
    p.add_argument("--wd-kernel-scale", type=float, default=1.0, help="multiplies wd on the copies / deltas only")
    p.add_argument("--pull", type=float, default=0.0, help="dec only: extra L2 (decay rate) on the deltas")
    p.add_argument("--delta-lr-scale", type=float, default=1.0, help="dec only: lr multiplier of the deltas")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--bs", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    d = diag_data.load(a.samples)
    xtr, ytr = d["train"]
    xte, yte = d["test"]
    torch.manual_seed(a.seed)
    model = build(a.model, a.n)
    plain_weights = [m.weight for m in model.modules() if isinstance(m, KERNEL_TYPES)]
    dec_layers = None
    if a.method == "mk":
        gs = a.grad_scale
        try:
            gs = float(gs)
        except ValueError:
            pass
        apply_majority_kernels(model, k=a.k, scheme=a.scheme, init="replicate", grad_scale=gs, seed=a.seed)
        # (return value ignored on purpose: the API may return a handle)
    elif a.method == "dec":
        dec_layers = apply_decoupled(model, a.k, a.scheme, a.seed)
    view = View(model, a.method, a.k, a.scheme if a.method != "plain" else None, plain_weights, dec_layers)

    kernel_params = {id(t) for t in (view.copies if a.method == "mk" else [m.delta for m in dec_layers] if a.method == "dec" else [])}
    base = [q for q in model.parameters() if id(q) not in kernel_params]
    kern = [q for q in model.parameters() if id(q) in kernel_params]
    groups = [{"params": base, "weight_decay": a.wd}]
    if kern:
        wd_k = a.wd * a.wd_kernel_scale + (a.pull if a.method == "dec" else 0.0)
        groups.append({"params": kern, "weight_decay": wd_k, "lr": a.lr * (a.delta_lr_scale if a.method == "dec" else 1.0)})
    if a.opt == "sgd":
        opt = torch.optim.SGD(groups, lr=a.lr, momentum=a.momentum)
    else:
        opt = torch.optim.Adam(groups, lr=a.lr)
    steps_per_epoch = math.ceil(len(xtr) / a.bs)
    total = steps_per_epoch * a.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.5 * (1 + math.cos(math.pi * s / total))) if a.schedule == "cosine" else (lambda s: 1.0)
    )
    # the decay rate the mean sees: mk copies decay at wd*scale (mean too), plain / dec-mu at wd
    wd_mean = a.wd * (a.wd_kernel_scale if a.method == "mk" else 1.0)

    g = torch.Generator().manual_seed(a.seed)
    log = []
    t0 = time.time()
    prev_epoch_means = view.means()
    for epoch in range(1, a.epochs + 1):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        gsq, dsq, path, move_sq, nstep = 0.0, 0.0, 0.0, 0.0, 0
        run_correct = 0
        for i in range(0, len(xtr), a.bs):
            idx = perm[i : i + a.bs]
            out = model(xtr[idx])
            loss = F.cross_entropy(out, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            run_correct += (out.argmax(1) == ytr[idx]).sum().item()
            before = view.means()
            gm = view.mean_grads()
            gsq += sum(x.pow(2).sum().item() for x in gm)
            dsq += wd_mean**2 * sum(x.pow(2).sum().item() for x in before)
            lr_now = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            after = view.means()
            step2 = sum((u - v).pow(2).sum().item() for u, v in zip(after, before))
            nel = sum(v.numel() for v in before)
            path += math.sqrt(step2)
            move_sq += step2 / nel / lr_now**2
            nstep += 1
        means = view.means()
        wn = math.sqrt(sum(x.pow(2).sum().item() for x in means))
        disp = math.sqrt(sum((u - v).pow(2).sum().item() for u, v in zip(means, prev_epoch_means)))
        prev_epoch_means = means
        tr_s, loss_s = accuracy(model, xtr, ytr, True) if a.method != "plain" else (None, None)
        tr_m, loss_m = accuracy(model, xtr, ytr, False)
        te, _ = accuracy(model, xte, yte, False)
        sp, spmax, noise = view.spread_and_noise()
        rec = {
            "epoch": epoch,
            "train_acc_running": 100.0 * run_correct / len(xtr),
            "train_acc_sampled": tr_s if tr_s is not None else tr_m,
            "train_acc_mean": tr_m,
            "train_loss_sampled": loss_s if loss_s is not None else loss_m,
            "train_loss_mean": loss_m,
            "test_acc": te,
            "spread": sp,
            "spread_max": spmax,
            "sample_noise": noise,
            "mean_norm": wn,
            "epoch_disp_rel": disp / wn,
            "path_rel": path / wn,
            "step_rms_over_lr": math.sqrt(move_sq / nstep),
            "grad_mean_rms": math.sqrt(gsq / nstep),
            "decay_rms": math.sqrt(dsq / nstep),
            "decay_over_grad": math.sqrt(dsq / gsq) if gsq > 0 else None,
        }
        log.append(rec)
    result = {"args": vars(a), "epochs": log, "seconds": time.time() - t0, "final": log[-1]}
    try:
        result["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    f = log[-1]
    print(
        f"{os.path.basename(a.out)}: test {f['test_acc']:.1f} train(mean) {f['train_acc_mean']:.1f} "
        f"train(sampled) {f['train_acc_sampled']:.1f} spread {f['spread']:.3f} noise {f['sample_noise']:.3f} "
        f"decay/grad {f['decay_over_grad'] or 0:.3f} {result['seconds']:.0f}s"
    )


if __name__ == "__main__":
    main()
