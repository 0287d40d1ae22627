"""Submodular neuron selection: the baseline that turns a trained k-times-wider model into the small one.

In every prunable hidden dimension (``model.hidden()``) choose ``n`` of the wide model's ``k*n`` units
by greedily maximising a (weakly) submodular objective on their activations, keep those units'
producer rows and norm entries, and re-fit the consumer's input weights by least squares, as in
El Halabi, Srinivas, Lacoste-Julien, "Data-efficient structured pruning via submodular optimization"
(NeurIPS 2022).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OBJECTIVES", "facility_location", "reconstruction", "least_squares_refit", "prune_to_width"]

OBJECTIVES = ("reconstruction", "facility_location")
#: An eigenvalue of a candidate's orthogonalised Gram matrix below this fraction of the candidate's own
#: squared norm is rounding noise, not a new direction (singular values below 1e-5 relative).
_NEW_DIRECTION_TOL = 1e-10


def _check_budget(budget: int, units: int) -> None:
    if not 0 < budget <= units:
        raise ValueError(f"budget must be in 1..{units} (the number of units), got {budget}")


def facility_location(features: Tensor, budget: int) -> tuple[list[int], list[float]]:
    """Lazy greedy for F(S) = sum_i max_{j in S} sim(i, j) over the units (rows of ``features``).

    ``sim = (1 + cos) / 2``: cosine similarity of the units' feature vectors shifted to [0, 1], so
    F is monotone submodular (non-negative similarity) and scale-free (a unit and a rescaled copy of
    it are the same representative). F is submodular, so a unit's last computed gain bounds its
    current one: only the top of the queue needs re-evaluation (same picks as plain greedy, with
    ties going to the lower index). Returns the picks in order and F after each pick.
    """
    unit = F.normalize(features.double().flatten(1), dim=1)
    sim = (1 + unit @ unit.T) / 2
    _check_budget(budget, len(sim))
    covered = sim.new_zeros(len(sim))  # max similarity of each unit to the picks; F(empty set) = 0
    heap = [(-bound, j) for j, bound in enumerate(sim.sum(0).tolist())]
    heapq.heapify(heap)
    picks: list[int] = []
    values: list[float] = []
    while len(picks) < budget:
        _, j = heapq.heappop(heap)
        gain = float((sim[:, j] - covered).clamp_min(0).sum())
        if heap and (-gain, j) > heap[0]:  # a stale bound was on top: re-queue it with its true gain
            heapq.heappush(heap, (-gain, j))
            continue
        covered = torch.maximum(covered, sim[:, j])
        picks.append(j)
        values.append(float(covered.sum()))
    return picks, values


def reconstruction(units: Tensor, target: Tensor, budget: int) -> tuple[list[int], list[float]]:
    """Greedy for F(S) = ||T||^2 - min_V ||T - A_S V||^2 (El Halabi et al. 2022), T = ``target``.

    ``units[:, u]`` holds unit u's G columns of A. F is weakly submodular, so greedy keeps a
    guarantee. All candidates are kept orthogonalised against the chosen columns, so a candidate's
    gain is the squared norm of the residual projected on its orthogonalised span (through the
    eigendecomposition of its G x G Gram matrix). A candidate with no new direction left (an exact
    duplicate, a linear combination of the picks, a dead unit) adds nothing and is only taken once
    no candidate adds a direction. Returns the picks in order and F after each pick.
    """
    _check_budget(budget, units.shape[1])
    # [N, U, G], orthogonalised against the picks as they come (in place, through the [N, U*G] view)
    columns = units.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    flat = columns.view(len(columns), -1)
    residual = target.double().clone()
    # per candidate: Gram matrix and columns' products with the residual, downdated as the basis grows
    gram = torch.einsum("nug,nuh->ugh", columns, columns)
    cross = flat.T @ residual
    own_norm = gram.diagonal(dim1=1, dim2=2).sum(1)
    available = torch.ones(columns.shape[1], dtype=torch.bool, device=columns.device)
    picks: list[int] = []
    values: list[float] = []
    value = 0.0
    for _ in range(budget):
        eigval, eigvec = torch.linalg.eigh(gram)
        new = eigval > _NEW_DIRECTION_TOL * own_norm[:, None]
        along = eigvec.transpose(1, 2) @ cross.view(*gram.shape[:2], -1)
        gain = torch.where(new, along.square().sum(2) / eigval, 0).sum(1)
        gain = torch.where(new.any(1), gain, -1.0).masked_fill(~available, -torch.inf)
        u = int(gain.argmax())
        available[u] = False
        basis = columns[:, u] @ (eigvec[u][:, new[u]] / eigval[u][new[u]].sqrt())  # orthonormal, [N, r]
        explained = basis.T @ residual
        value += float(explained.square().sum())
        residual.addmm_(basis, explained, alpha=-1)
        coef = basis.T @ flat
        flat.addmm_(basis, coef, alpha=-1)
        cross.addmm_(coef.T, explained, alpha=-1)
        coef = coef.view(len(coef), *gram.shape[:2])
        gram -= torch.einsum("rug,ruh->ugh", coef, coef)
        picks.append(u)
        values.append(value)
    return picks, values


def least_squares_refit(units_kept: Tensor, target: Tensor) -> Tensor:
    """argmin_V ||target - units_kept V||, as ``[n*G, O]`` in ``target``'s dtype.

    Solved in float64 as a ridge with damping 1e-10 x the Gram matrix's mean diagonal: duplicate or
    dead kept units (a singular Gram matrix) get a finite, evenly split fit on any device, where
    ``torch.linalg.lstsq``'s handling of rank deficiency depends on the driver.
    """
    x, t = units_kept.double(), target.double()
    gram = x.T @ x
    damping = 1e-10 * gram.diagonal().mean() + torch.finfo(torch.float64).tiny
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + damping * eye, x.T @ t).to(target.dtype)


def _unit_rows(consumer: nn.Module, x: Tensor) -> Tensor:
    """The consumer's input as ``[samples, units, G]``: every token or output position is a sample and
    G is the in-kernel size (the patch a conv consumer reads from each unit, with its own padding)."""
    if isinstance(consumer, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1)
    if not (type(consumer) in (nn.Conv1d, nn.Conv2d) and consumer.groups == 1 and consumer.padding_mode == "zeros"
            and not isinstance(consumer.padding, str)):
        raise TypeError(f"unsupported consumer {consumer}: need Linear, or Conv1d/Conv2d, groups=1, numeric padding")
    units = x.shape[1]
    if isinstance(consumer, nn.Conv2d):
        patches = F.unfold(x, consumer.kernel_size, consumer.dilation, consumer.padding, consumer.stride)
        patches = patches.unflatten(1, (units, -1))  # [B, U, G, positions]
    else:
        (k,), (d,), (p,), (s,) = consumer.kernel_size, consumer.dilation, consumer.padding, consumer.stride
        patches = F.pad(x, (p, p)).unfold(2, d * (k - 1) + 1, s)[..., ::d].transpose(2, 3)
    return patches.permute(0, 3, 1, 2).reshape(-1, units, patches.shape[2])


def _subsample(rows: Tensor, cap: int, generator: torch.Generator) -> Tensor:
    if len(rows) <= cap:
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:cap].to(rows.device)]


def prune_to_width(
    wide: nn.Module,
    small: nn.Module,
    inputs: Iterable[Tensor],
    objective: str = "reconstruction",
    refit: bool = True,
    max_samples: int = 4096,
) -> nn.Module:
    """Fill ``small`` (width n) from ``wide`` (same class, width k*n) by selecting n units per hidden dimension.

    ``inputs`` are calibration batches (a ``(x, y)`` batch uses ``x``); ``wide`` runs on them once in
    eval mode and every selection uses those unpruned activations, capped at ``max_samples`` rows per
    dimension (random subset, fixed seed, so CPU runs stay fast and repeatable). The chosen units keep
    their producer rows and norm entries, in the wide model's order. The consumer gets the chosen
    input columns, or with ``refit`` the least-squares fit of its original input contribution
    (its output without bias); its bias is kept as is. Everything else is copied unchanged, and
    ``small`` is loaded strictly, so every key of it is filled. Returns ``small``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    hiddens, small_hiddens = wide.hidden(), small.hidden()
    if [h.name for h in hiddens] != [h.name for h in small_hiddens]:
        raise ValueError("wide and small must be the same architecture: their hidden() dimensions differ")
    generator = torch.Generator().manual_seed(0)
    rows: dict[str, list[Tensor]] = {h.name: [] for h in hiddens}
    handles = [
        h.consumer.register_forward_pre_hook(
            lambda module, args, store=rows[h.name]: store.append(
                _subsample(_unit_rows(module, args[0].detach()), max_samples, generator)
            )
        )
        for h in hiddens
    ]
    device, was_training = next(wide.parameters()).device, wide.training
    wide.eval()
    try:
        with torch.no_grad():
            for batch in inputs:
                wide((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
    finally:
        for handle in handles:
            handle.remove()
        wide.train(was_training)

    names = {module: name for name, module in wide.named_modules()}
    state = wide.state_dict()  # entries are replaced, never written to: wide stays as it was
    chosen = []
    with torch.no_grad():
        for h, s in zip(hiddens, small_hiddens):
            units = _subsample(torch.cat(rows[h.name]), max_samples, generator).double()
            weight = h.consumer.weight
            target = units.flatten(1) @ weight.double().flatten(1).T
            n = s.producer.weight.shape[0]
            if objective == "reconstruction":
                picks = reconstruction(units, target, n)[0]
            else:
                picks = facility_location(units.transpose(0, 1).flatten(1), n)[0]
            idx = torch.tensor(sorted(picks), device=weight.device)
            key = names[h.consumer] + ".weight"
            if refit:
                fit = least_squares_refit(units[:, idx].flatten(1), target).T
                state[key] = fit.reshape(len(weight), n, *weight.shape[2:]).to(weight.dtype)
            else:
                state[key] = weight[:, idx]
            chosen.append((h, idx))
        # Rows after all columns: an MLP's middle layer consumes one dimension and produces the next.
        for h, idx in chosen:
            for module in filter(None, (h.producer, h.norm)):
                for key in ("weight", "bias", "running_mean", "running_var"):
                    if f"{names[module]}.{key}" in state:
                        state[f"{names[module]}.{key}"] = state[f"{names[module]}.{key}"][idx]
    small.load_state_dict(state)
    return small
