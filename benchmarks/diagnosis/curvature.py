"""What does MK's training loss optimise, in terms of the deployed (mean) model?

For `select`, the sampled kernel is W_s = mean + D, where each element of D is the chosen copy's deviation
from the mean: E[D] = 0, elements independent, Var(D_e) = s_e^2 = mean_i (W_ie - mean_e)^2. Expanding,

    E[L(W_s)] = L(mean) + 1/2 sum_e H_ee s_e^2 + O(s^3),   and   sum_e H_ee s_e^2 = E_v[u^T H u], u = v * s,

v Rademacher, H the Hessian of the training loss at the mean (cross terms vanish: the draws of different
elements and kernels are independent). So MK's objective is the deployed model's loss plus a curvature
penalty set by the copies' spread: the k*n parameters buy a noise level, not capacity.

This script checks that expansion on trained models. It trains plain and MK (copies, `select`, k=4,
`replicate`) from the same initial weights, and after the given epochs measures on a fixed subset of
the training set: plain's loss, the mean's loss L(mean), the sampled loss E[L(W_s)] over --draws draws
(the library's own draws), and the penalty 1/2 E[u^T H u] over --probes probes (Hessian-vector products
of the collapsed model's loss), each with its standard error (``_se``). Prints one JSON line per checkpoint.

    python benchmarks/diagnosis/curvature.py --samples 62500 --optimizer adam --lr 1e-3 --epochs 1 3 10
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as diag_data  # noqa: E402

from lightning_mk import apply_majority_kernels, collapse, copy_spread, kernel_copies  # noqa: E402
from lightning_mk.experiments.models import MLP  # noqa: E402


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / len(values) ** 0.5)


def penalty(mean_model: nn.Module, spreads: dict[str, torch.Tensor], x, y, probes: int, generator) -> list[float]:
    """1/2 u^T H u for each probe u = v * s on every kernel (v Rademacher, s: the draw's per-element std)."""
    params = dict(mean_model.named_parameters())
    kernels = [params[name] for name in spreads]
    values = []
    for _ in range(probes):
        us = [spreads[name] * (torch.randint(0, 2, s.shape, generator=generator) * 2 - 1) for name, s in spreads.items()]
        grads = torch.autograd.grad(loss_of(mean_model, x, y), kernels, create_graph=True)
        hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, us)), kernels)
        values.append(0.5 * sum(float((h * u).sum()) for h, u in zip(hvp, us)))
    return values


def measure(plain: nn.Module, mk_model: nn.Module, mk, x, y, draws: int, probes: int) -> dict:
    copies = {name: c.detach() for name, c in kernel_copies(mk_model).items()}
    mean_model = collapse(copy.deepcopy(mk_model)).train()  # dropout is 0: train mode = eval mode here
    spreads = {name: (c - c.mean(0)).pow(2).mean(0).sqrt() for name, c in copies.items()}
    step = mk.step
    with torch.no_grad():
        plain.eval()
        mk_model.eval()
        result = {"plain": float(loss_of(plain, x, y)), "mean": float(loss_of(mk_model, x, y))}
        mk_model.train()
        sampled = []
        for i in range(draws):
            mk.step = 10**6 + i  # draws no training step used
            sampled.append(float(loss_of(mk_model, x, y)))
    mk.step = step
    result["sampled"], result["sampled_se"] = mean_and_se(sampled)
    result["gap"] = result["sampled"] - result["mean"]
    result["penalty"], result["penalty_se"] = mean_and_se(penalty(mean_model, spreads, x, y, probes, torch.Generator().manual_seed(0)))
    result["spread"] = statistics.mean(copy_spread(mk_model).values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=62500)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10], help="measure after these epochs")
    parser.add_argument("--subset", type=int, default=4096, help="training samples the losses are measured on")
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = diag_data.load(args.samples)
    x_train, y_train = data["train"]
    torch.manual_seed(args.seed)
    plain = MLP((x_train.shape[1],), 10, n=args.n)
    mk_model = copy.deepcopy(plain)
    mk = apply_majority_kernels(mk_model, k=4, scheme="select", init="replicate", seed=args.seed)

    def optimizer(model):
        if args.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=args.lr)
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    models = [(plain, optimizer(plain), None), (mk_model, optimizer(mk_model), mk)]
    subset = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[: args.subset]
    order = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(1, max(args.epochs) + 1):
        for batch in torch.randperm(len(x_train), generator=order).split(128):
            for model, opt, kernels in models:
                model.train()
                if kernels is not None:
                    kernels.step = step
                opt.zero_grad(set_to_none=True)
                loss_of(model, x_train[batch], y_train[batch]).backward()
                opt.step()
            step += 1
        if epoch in args.epochs:
            row = measure(plain, mk_model, mk, x_train[subset], y_train[subset], args.draws, args.probes)
            print(json.dumps({"epoch": epoch, **{key: round(value, 4) for key, value in row.items()}}), flush=True)


if __name__ == "__main__":
    main()
