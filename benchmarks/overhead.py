"""Training-step time and memory of Majority Kernels against the plain and the wide model.

    python benchmarks/overhead.py [--steps 30] [--rounds 5] [--optimizer adam-fused] [--device cpu] [--out benchmarks/results]

For an MLP, a ResNet and a Transformer at batch 128 it measures, in one process and interleaved
(round-robin over all variants, after warm-up), the median time of one full training step
(forward, backward, optimizer step) of: the plain small model; the "k-copy floor" (the plain step
plus a fresh gradient of (k-1) x the kernel parameters and an optimizer step over them: what any
method training k copies pays at least); MK for every scheme and k in {2, 4, 8}, and as the callback trains by
default (``mk default``: form ``relative``, its noise level and decay); the wide (k x n) model. Peak memory is measured per variant in a fresh subprocess (peak RSS of a few steps, minus
the same process's RSS before the model is built). Then: collapse time of a ~50M-parameter model,
and the inference latency of a collapsed model against the plain model (the same architecture, so
the ratio should be 1.00), and of the MK model in eval mode (its mean is computed once and reused).

``--compile``: plain, the floor, every scheme and the default at k = 4, each eager and ``torch.compile(model,
fullgraph=True)`` (inductor), interleaved. ``--family``: the same for plain, the floor, MK (``select`` and the
default), DO-Conv and ExpandNets at k = 4, with each one's peak extra memory. ``--phases``: the median forward,
backward and optimizer time of plain, the floor, the floor paid through ``torch.nn.utils.parametrize``
(``parametrized floor``), ``select`` and the default at k = 4, interleaved (each phase timed on its own, no
profiler). ``--layers``: for the same variants, the median forward time of each layer with a kernel (reading the
kernel, i.e. the draw, and the layer's op) and of the whole forward, timed by forward hooks in whole training
steps. ``--profile MODEL VARIANT``: the top operators of 10 eager steps of one variant (torch.profiler), to
see where its time goes. ``--device cuda``: the same on a GPU (each step
synchronised; peak memory from ``torch.cuda.max_memory_allocated``), written as ``overhead-*-cuda.md``. Denormal
floats are flushed to zero (``torch.set_flush_denormal``), so that no step time depends on the data.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lightning_mk import MajorityKernelCallback, apply_majority_kernels, collapse
from lightning_mk.forms import get_form
from lightning_mk.layers import eligible_layers, resolve_layer_types
from lightning_mk.experiments.models import MLP, ResNet, Transformer
from lightning_mk.schemes import SCHEMES

BATCH = 128
MODELS = {
    # name: (builder(width), input shape); sizes where a plain CPU step takes tens of milliseconds
    "mlp": (lambda n: MLP((512,), 10, n=n, depth=3), (512,), 1024),
    "resnet": (lambda n: ResNet((1, 64), 10, n=n, channels=48, blocks=3), (1, 64), 48),
    "transformer": (lambda n: Transformer((64,), 10, n=n, d_model=64, heads=4, layers=3, patch=4), (64,), 128),
}
KS = (2, 4, 8)
DEVICE = torch.device("cpu")  # set by --device


def make_optimizer(params, name: str) -> torch.optim.Optimizer:
    return {"adam": lambda: torch.optim.Adam(params, lr=1e-3), "adam-fused": lambda: torch.optim.Adam(params, lr=1e-3, fused=True)}[name]()


def kernel_numel(model: nn.Module) -> int:
    """Parameters that MK would copy: the kernels of the supported layers (tied ones once)."""
    eligible = eligible_layers(model, resolve_layer_types(None), biases=False)
    kernels = {id(layer._parameters[p]): layer._parameters[p] for uses in eligible.values() for layer, p in uses}
    return sum(p.numel() for p in kernels.values())


class Variant:
    """One model + optimizer + a fixed batch; ``step()`` is one full training step."""

    def __init__(self, name: str, model: nn.Module, optimizer: str, shape, extra_numel: int = 0) -> None:
        torch.manual_seed(0)
        self.name, self.model = name, model.to(DEVICE).train()
        params = list(model.parameters())
        self.extra = None
        if extra_numel:  # the k-copy floor: a gradient of this many more parameters, and their optimizer step
            self.extra = nn.Parameter(torch.zeros(extra_numel, device=DEVICE))
            params.append(self.extra)
        self.optimizer = make_optimizer(params, optimizer)
        self.x = torch.randn(BATCH, *shape, device=DEVICE)
        self.y = torch.randint(0, 10, (BATCH,), device=DEVICE)
        self.times: list[float] = []  # whole steps
        self.phases: list[list[float]] = []  # (forward, backward, optimizer) of each step timed by phase

    def step(self, phases: bool = False) -> None:
        """One training step; ``phases``: append its (forward, backward, optimizer) seconds to ``self.phases`` (the
        forward counts the gradients' reset, the backward the floor's fresh gradient; the device synchronised after each)."""
        marks = [time.perf_counter()]
        for p in self.model.parameters():
            p.grad = None
        loss = F.cross_entropy(self.model(self.x), self.y)
        if phases:
            _sync()
            marks.append(time.perf_counter())
        loss.backward()
        if self.extra is not None:  # written afresh each step, as every copy's gradient is
            self.extra.grad = torch.full_like(self.extra, 1e-3)
        if phases:
            _sync()
            marks.append(time.perf_counter())
        self.optimizer.step()
        _sync()
        if phases:
            marks.append(time.perf_counter())
            self.phases.append([after - before for before, after in zip(marks, marks[1:])])


def _sync() -> None:
    """Wait for the GPU's queued work (so that a timer measures it); nothing on the CPU."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def variants(model_name: str, optimizer: str):
    build, shape, n = MODELS[model_name]
    torch.manual_seed(0)
    plain = build(n)
    yield "plain", lambda: Variant("plain", copy.deepcopy(plain), optimizer, shape)
    for k in KS:
        yield f"floor k={k}", lambda k=k: Variant(f"floor k={k}", copy.deepcopy(plain), optimizer, shape, (k - 1) * kernel_numel(plain))
        for scheme in SCHEMES:
            yield f"mk {scheme} k={k}", lambda k=k, s=scheme: Variant(
                f"mk {s} k={k}", apply_majority_kernels(copy.deepcopy(plain), k=k, scheme=s).module, optimizer, shape
            )
        default = MajorityKernelCallback(k=k).settings  # what the callback trains (at its ceiling noise level)
        yield f"mk default k={k}", lambda k=k, d=default: Variant(
            f"mk default k={k}", apply_majority_kernels(copy.deepcopy(plain), d).module, optimizer, shape
        )
        yield f"wide k={k}", lambda k=k: Variant(f"wide k={k}", build(k * n), optimizer, shape)


def family(model_name: str, optimizer: str, k: int = 4):
    """The re-parametrisations DO-Conv (where the model has convolutions with several taps) and ExpandNets, at
    ``k``: (name, builder) as :func:`variants`."""
    build, shape, n = MODELS[model_name]
    torch.manual_seed(0)
    plain = build(n)
    options = {f"expand k={k}": dict(k=k, form="expand")}
    eligible = eligible_layers(plain, resolve_layer_types(None), biases=False)
    if any(get_form("doconv").supports(layer, layer._parameters[p]) for uses in eligible.values() for layer, p in uses):
        options["doconv"] = dict(form="doconv")
    for name, chosen in options.items():
        yield name, lambda name=name, chosen=chosen: Variant(name, apply_majority_kernels(copy.deepcopy(plain), **chosen).module, optimizer, shape)


class _FirstCopy(nn.Module):
    """A parametrization storing ``k`` rows of a kernel and training the first: what ``torch.nn.utils.parametrize``
    itself costs a layer (the property, the parametrization's call, the row's gradient into a ``[k, *S]`` tensor)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored[0]

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value.unsqueeze(0).repeat(self.k, *[1] * value.dim())


def parametrized_floor(model_name: str, k: int) -> nn.Module:
    """The plain model with :class:`_FirstCopy` on every kernel: the floor, paid through parametrize."""
    build, _, n = MODELS[model_name]
    torch.manual_seed(0)
    model = build(n)
    for uses in eligible_layers(model, resolve_layer_types(None), biases=False).values():
        layer, name = uses[0]  # the benchmark's models tie no kernels
        parametrize.register_parametrization(layer, name, _FirstCopy(k), unsafe=True)
    return model


def _against_floors(model_name: str, optimizer: str, k: int) -> dict[str, Variant]:
    """Plain, the floor, :func:`parametrized_floor`, ``select`` and the callback's default at ``k``."""
    shape = MODELS[model_name][1]
    made = dict(variants(model_name, optimizer))
    made[f"parametrized floor k={k}"] = lambda: Variant(f"parametrized floor k={k}", parametrized_floor(model_name, k), optimizer, shape)
    wanted = ["plain", f"floor k={k}", f"parametrized floor k={k}", f"mk select k={k}", f"mk default k={k}"]
    return {name: made[name]() for name in wanted}


def phases(model_name: str, optimizer: str, steps: int, rounds: int, k: int = 4) -> list[str]:
    """Median forward, backward and optimizer time of :func:`_against_floors`' variants, interleaved after warm-up."""
    runs = _against_floors(model_name, optimizer, k)
    interleave(runs.values(), steps, rounds, phases=True)
    rows = []
    for name, v in runs.items():
        medians = [statistics.median(column) * 1000 for column in zip(*v.phases)]
        rows.append(f"| {model_name} | {name} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {sum(medians):.2f} |")
    return rows


def layer_times(model_name: str, optimizer: str, steps: int, rounds: int, k: int = 4) -> list[str]:
    """Median forward time, in microseconds, of each layer with a kernel (from its forward pre-hook to its forward hook:
    reading the kernel, i.e. the parametrization and the draw, and the layer's own op) and of the whole forward (the
    draw-step hook included), in training steps of :func:`_against_floors`' variants, interleaved after warm-up."""
    runs = _against_floors(model_name, optimizer, k)
    types = tuple(t for t in resolve_layer_types(None) if isinstance(t, type))  # (not those named by a string)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in runs}

    def timed(into: dict, label: str, module: nn.Module, prepend: bool = False) -> None:
        def start(*_) -> None:
            _sync()
            module._timer = time.perf_counter()

        def stop(*_) -> None:
            _sync()
            into.setdefault(label, []).append(time.perf_counter() - module._timer)

        module.register_forward_pre_hook(start, prepend=prepend)
        module.register_forward_hook(stop)

    for name, v in runs.items():
        for label, layer in v.model.named_modules():
            if isinstance(layer, types):  # a layer its parent calls through its own forward (not attention's out_proj)
                timed(times[name], label, layer)
        timed(times[name], "whole forward", v.model, prepend=True)
    interleave(runs.values(), steps, rounds)
    labels = [label for label in times["plain"] if label != "whole forward"] + ["whole forward"]
    return [f"| {model_name} | {label} | " + " | ".join(f"{statistics.median(times[name][label]) * 1e6:.1f}" for name in runs)
            + " |" for label in labels]


def interleave(runs, steps: int, rounds: int, phases: bool = False) -> None:
    """Warm each variant up (3 steps; a compiled one compiles here), then time ``rounds`` rounds of ``steps`` steps of
    each in turn: whole steps into ``times`` or, with ``phases``, each phase into ``phases``."""
    runs = list(runs)
    for v in runs:
        for _ in range(3):
            v.step()
    for _ in range(rounds):
        for v in runs:
            for _ in range(steps):
                start = time.perf_counter()
                v.step(phases)
                if not phases:
                    v.times.append(time.perf_counter() - start)


def time_steps(model_name: str, optimizer: str, steps: int, rounds: int) -> dict[str, float]:
    built = [make() for _, make in variants(model_name, optimizer)]
    interleave(built, steps, rounds)
    return {v.name: statistics.median(v.times) for v in built}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_peak_memory(model_name: str, optimizer: str, variant: str) -> None:
    """In a fresh process: peak RSS (sampled every 0.5 ms by a thread; on a GPU, its peak allocated memory) during
    the build and 3 steps of one variant, minus the same before; printed in MB."""
    import threading

    def build_and_step() -> None:
        v = (dict(variants(model_name, optimizer)) | dict(family(model_name, optimizer)))[variant]()
        for _ in range(3):
            v.step()

    if DEVICE.type == "cuda":
        base = torch.cuda.memory_allocated()
        build_and_step()
        return print((torch.cuda.max_memory_allocated() - base) / 2**20)
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    build_and_step()
    done.set()
    sampler.join()
    print(max(peak[0], _rss_mb()) - base)


def peak_memory_mb(model_name: str, optimizer: str, variant: str) -> float:
    code = (
        f"import torch, benchmarks.overhead as o; o.DEVICE = torch.device({DEVICE.type!r}); "
        f"o.measure_peak_memory({model_name!r}, {optimizer!r}, {variant!r})"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def compiled_vs_eager(model_name: str, optimizer: str, steps: int, rounds: int, with_family: bool = False, k: int = 4) -> list[str]:
    """Median step of plain, the floor, every scheme and the callback's default at k (``with_family``: select, the default, DO-Conv
    and ExpandNets, with their peak extra memory, eager), eager and ``torch.compile(fullgraph=True)`` (inductor;
    the optimizer step stays eager), interleaved after warm-up."""
    made = dict(variants(model_name, optimizer))
    if with_family:
        made |= dict(family(model_name, optimizer, k))
        wanted = [name for name in ("plain", f"floor k={k}", f"mk select k={k}", f"mk default k={k}", "doconv", f"expand k={k}") if name in made]
    else:
        wanted = ["plain", f"floor k={k}"] + [f"mk {scheme} k={k}" for scheme in SCHEMES] + [f"mk default k={k}"]
    runs = {}
    for name in wanted:
        runs[f"{name}, eager"] = made[name]()
        compiled = made[name]()
        compiled.model = torch.compile(compiled.model, fullgraph=True)
        runs[f"{name}, compiled"] = compiled
    interleave(runs.values(), steps, rounds)
    med = {name: statistics.median(v.times) for name, v in runs.items()}
    rows = []
    for name in wanted:
        eager, compiled = med[f"{name}, eager"], med[f"{name}, compiled"]
        memory = f" {peak_memory_mb(model_name, optimizer, name):.1f} |" if with_family else ""
        rows.append(
            f"| {model_name} | {name} | {eager * 1000:.2f} | {compiled * 1000:.2f} | {eager / med['plain, eager']:.2f} "
            f"| {compiled / med['plain, compiled']:.2f} |{memory}"
        )
    return rows


def profile(model_name: str, variant: str, optimizer: str, rows: int = 12) -> str:
    """The top operators by self CPU time over 10 eager steps of one variant, after 5 warm-up steps."""
    from torch.profiler import profile as torch_profile

    v = dict(variants(model_name, optimizer))[variant]()
    for _ in range(5):
        v.step()
    with torch_profile() as prof:
        for _ in range(10):
            v.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def collapse_and_latency(repeats: int = 30) -> list[str]:
    """Collapse time of a ~50M-parameter MLP, and the inference latency (no autograd) of the plain model, the
    MK model in eval mode (the mean, computed once and reused) and the collapsed model, interleaved."""
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)).to(DEVICE)
    n_params = sum(p.numel() for p in big.parameters())
    plain = copy.deepcopy(big).eval()
    apply_majority_kernels(big, k=4, init="independent")
    mk = copy.deepcopy(big).eval()
    start = time.perf_counter()
    collapse(big)
    _sync()
    seconds = time.perf_counter() - start
    big.eval()
    x = torch.randn(64, 4096, device=DEVICE)
    models = {"plain": plain, "MK, eval mode": mk, "collapsed": big}
    times = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(5):
            for model in models.values():
                model(x)
        for _ in range(repeats):  # interleaved
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                _sync()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return [
        f"- collapse of a {n_params / 1e6:.1f}M-parameter MLP (3 x Linear(4096, 4096), k=4): {seconds:.3f} s "
        f"({seconds / (n_params / 1e7):.3f} s per 10M parameters)",
        f"- inference latency, batch 64, no autograd, median of {repeats} interleaved: plain {med['plain']:.2f} ms, "
        f"MK in eval mode {med['MK, eval mode']:.2f} ms (ratio {med['MK, eval mode'] / med['plain']:.2f}), collapsed "
        f"{med['collapsed']:.2f} ms (ratio {med['collapsed'] / med['plain']:.2f})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--optimizer", default="adam-fused", choices=["adam", "adam-fused"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--compile", action="store_true", help="only time torch.compile (inductor) against eager, k=4")
    parser.add_argument("--family", action="store_true", help="as --compile, for MK, DO-Conv and ExpandNets, with memory")
    parser.add_argument("--phases", action="store_true", help="only forward, backward and optimizer medians, k=4")
    parser.add_argument("--layers", action="store_true", help="only each layer's forward time, as --phases' variants")
    parser.add_argument("--latency", action="store_true", help="only the collapse and inference-latency part")
    parser.add_argument("--profile", nargs=2, metavar=("MODEL", "VARIANT"), help='e.g. mlp "mk select k=4"')
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    # Every variant trains on one fixed batch: once a model has memorised it, its gradients can fall into the
    # denormal range, where x86 arithmetic is several times slower (docs/overhead.md); flushed to zero, a step's
    # time no longer depends on how far a variant got
    torch.set_flush_denormal(True)

    command = " ".join(["python benchmarks/overhead.py", *sys.argv[1:]])
    lines = [
        f"# Overhead: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if DEVICE.type == "cuda" else "")
        + f", torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Batch {BATCH}; median step time over {args.rounds} interleaved rounds of "
        f"{args.steps} steps; optimizer {args.optimizer}.",
        "",
    ]
    if args.profile:
        return print(profile(*args.profile, args.optimizer))
    if args.latency:
        lines += ["## Collapse and inference", ""] + collapse_and_latency() + [""]
        print("\n".join(lines[-3:]))
        return _write(args, "latency", lines)
    if args.phases:
        lines += ["| model | variant | forward (ms) | backward (ms) | optimizer (ms) | sum (ms) |", "|---|---|--:|--:|--:|--:|"]
        for model_name in args.models:
            rows = phases(model_name, args.optimizer, args.steps, args.rounds)
            lines += rows
            print("\n".join(rows), flush=True)
        return _write(args, "phases", lines)
    if args.layers:
        lines += ["Median forward time of each layer with a kernel (reading the kernel, i.e. the draw, and the layer's "
                  "op) and of the whole forward, in microseconds; k = 4.", "",
                  "| model | layer | plain | floor | parametrized floor | `select` | default |", "|---|---|--:|--:|--:|--:|--:|"]
        for model_name in args.models:
            rows = layer_times(model_name, args.optimizer, args.steps, args.rounds)
            lines += rows
            print("\n".join(rows), flush=True)
        return _write(args, "layers", lines)
    if args.compile or args.family:
        lines += [
            "| model | variant | eager (ms) | compiled (ms) | eager / plain eager | compiled / plain compiled |"
            + (" peak extra memory, eager (MB) |" if args.family else ""),
            "|---|---|--:|--:|--:|--:|" + ("--:|" if args.family else ""),
        ]
        for model_name in args.models:
            rows = compiled_vs_eager(model_name, args.optimizer, args.steps, args.rounds, with_family=args.family)
            lines += rows
            print("\n".join(rows), flush=True)
        return _write(args, "family" if args.family else "compile", lines)
    for model_name in args.models:
        build, _, n = MODELS[model_name]
        plain = build(n)
        medians = time_steps(model_name, args.optimizer, args.steps, args.rounds)
        base = medians["plain"]
        lines += [
            f"## {model_name} (n={n}, {sum(p.numel() for p in plain.parameters()):,} parameters, "
            f"{kernel_numel(plain):,} of them in kernels)",
            "",
            "| variant | step (ms) | / plain | / floor | peak extra memory (MB) |",
            "|---|--:|--:|--:|--:|",
        ]
        for name, median in medians.items():
            k = name.split("k=")[-1] if "k=" in name else None
            floor = medians.get(f"floor k={k}") if k else None
            memory = "" if args.no_memory else f"{peak_memory_mb(model_name, args.optimizer, name):.1f}"
            ratio_floor = f"{median / floor:.2f}" if floor and not name.startswith(("floor", "wide")) else ""
            lines.append(f"| {name} | {median * 1000:.2f} | {median / base:.2f} | {ratio_floor} | {memory} |")
        lines.append("")
        print("\n".join(lines[-len(medians) - 4 :]), flush=True)
    lines += ["## Collapse and inference", ""] + collapse_and_latency() + [""]
    print("\n".join(lines[-3:]))
    _write(args, args.optimizer, lines)


def _write(args, name: str, lines: list[str]) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"overhead-{name}{'-cuda' if args.device == 'cuda' else ''}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
