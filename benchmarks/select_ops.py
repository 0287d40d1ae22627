"""The ways to train one kernel under the ``select`` scheme, timed side by side.

    python benchmarks/select_ops.py [--k 4] [--sizes 6912 1048576] [--rounds 15] [--device cpu]

``select`` gives every element of a kernel one of its k copies. With stock operations that takes three steps,
each with several possible implementations: the index (from the 32-bit hashes, 16 two-bit lanes each at k = 4),
the forward (the chosen copy of each element) and the backward (the ``[k, n]`` gradient: the output's gradient at
the chosen copy, zero elsewhere). The last step, ``all``, is the three together: the library's CPU kernel
(:mod:`lightning_mk.native`, what CPU training uses, eager and compiled) against the fastest stock composition (the
first of each step: what the library uses on a GPU or where the kernel cannot be built). The step ``default`` is the
callback's default form (``relative``) around the same draw: its centre, its noise scale, the training kernel
``mu + c (deviations[i] - centre)`` and the stored tensor's gradient through its autograd node, with stock ops
(``forms._Selected``) and with the kernel. For each step and kernel size (elements) this prints the median time of each
implementation over ``--rounds`` interleaved rounds. All implementations of a step are checked to give the same
tensors before they are timed (for ``default`` to 1e-3: the kernel sums the noise scale in another order).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from lightning_mk import native
from lightning_mk.forms import _mean, _rms_ratio, _Selected
from lightning_mk.schemes import _mix, _split, _words


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _bytes(words: torch.Tensor, width: int) -> torch.Tensor:
    """:func:`_split` through a uint8 view of the hashes' low four bytes (little-endian), widened to int64 last
    (``width`` divides 8)."""
    low = words.view(torch.uint8).view(-1, 8)[:, :4].reshape(-1, 1)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=words.device)
    return (low >> shifts).bitwise_and_((1 << width) - 1).view(-1).long()


def implementations(k: int, n: int, device: torch.device) -> dict[str, dict[str, Callable[[], object]]]:
    """For each step, its implementations (name -> function of no arguments returning the step's tensor, or
    tensors)."""
    width = (k - 1).bit_length()
    words = _mix(torch.arange(_words(n, width), dtype=torch.int64, device=device))
    index = _split(words, width)[:n].view(1, n)
    copies = torch.randn(k, n, device=device)
    grad = torch.randn(1, n, device=device)
    offsets = torch.arange(n, device=device)
    rows = torch.arange(k, device=device).view(k, 1)
    index_ways = {"int64 shift and mask (lightning_mk, stock ops)": lambda: _split(words, width)[:n]}
    if 8 % width == 0:  # lanes that do not straddle a byte
        index_ways["uint8 bytes, widened last"] = lambda: _bytes(words, width)[:n]

    def stock() -> tuple[torch.Tensor, torch.Tensor]:  # the first of each step
        drawn = _split(words, width)[:n].view(1, n)
        return copies.gather(0, drawn).view(-1), copies.new_zeros(k, n).scatter_add_(0, drawn, grad)

    stored, level = torch.randn(k + 1, n, device=device, requires_grad=True), torch.tensor(0.3, device=device)

    def default(kernel: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = kernel()
        return out.detach(), *torch.autograd.grad(out, stored, grad.view(-1))

    def stock_default() -> torch.Tensor:  # what the library runs where the kernel does not
        mu, deviations = stored.detach()[0], stored.detach()[1:]
        center = _mean(deviations)
        c = level * _rms_ratio(mu, deviations - center)
        return _Selected.apply(stored, _split(words, width)[:n].view(1, n), center, c, None, 1.0)

    whole = {"stock: the index, gather, zeros and scatter_add_": stock}
    relative = {"stock: centre, noise scale, gather, in-place ops, mul and scatter_add_": lambda: default(
        stock_default)}
    if device.type == "cpu" and native.available():  # the hashes above are the stream 0 (state 0, constant 0)
        state = torch.zeros((), dtype=torch.int64)
        whole["lightning_mk CPU kernel: select and select_backward"] = lambda: (
            native.select(copies, state, 0), torch.ops.lightning_mk.select_backward(grad.view(-1), state, 0, k))
        node = "lightning_mk CPU kernel: select_around (draw, centre and noise scale, then scale) and its backward"
        relative[node] = lambda: default(lambda: native.select_around(stored, state, 0, level, True, None, 1.0))
    return {
        "index": index_ways,
        "forward": {
            "gather(0, index) (lightning_mk, stock ops)": lambda: copies.gather(0, index).view(-1),
            "take(index * n + arange)": lambda: copies.view(-1).take(index.view(-1) * n + offsets),
            "[n, k] view, gather(1, ...)": lambda: copies.t().gather(1, index.view(n, 1)).view(-1),
        },
        "backward": {
            "zeros, scatter_add_ (lightning_mk, stock ops)": lambda: copies.new_zeros(k, n).scatter_add_(0, index, grad),
            "zeros, scatter_": lambda: copies.new_zeros(k, n).scatter_(0, index, grad),
            "where(rows == index, grad, 0)": lambda: torch.where(rows == index, grad, 0.0),
        },
        "all": whole,
        "default": relative,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4, help="copies, a power of two")
    parser.add_argument("--sizes", type=int, nargs="+", default=[6912, 1 << 20], help="kernel elements")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.k < 2 or args.k & (args.k - 1):
        parser.error(f"--k must be a power of two of at least 2 (the lanes of one hash), got {args.k}")
    device = torch.device(args.device)
    print(f"k = {args.k}, torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads; median of "
          f"{args.rounds} interleaved rounds, in microseconds\n")
    print("| elements | step | implementation | time (us) | / first |\n|--:|---|---|--:|--:|")
    for n in args.sizes:
        for step, ways in implementations(args.k, n, device).items():
            results = {name: (lambda out: out if isinstance(out, tuple) else (out,))(way()) for name, way in ways.items()}
            first = next(iter(results.values()))
            for name, result in results.items():
                if step == "default":  # the noise scale summed in another order (the kernel's in double; a million
                    # float32 squares summed by the stock norm were 1e-5 off their exact sum)
                    for got, expected in zip(result, first):
                        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3,
                                                   msg=f"{step}: {name!r} differs from {next(iter(results))!r}")
                elif not all(map(torch.equal, result, first)):
                    raise AssertionError(f"{step}: {name!r} differs from {next(iter(results))!r}")
            repeats = max(1, (1 << 22) // n)  # about 4M elements per timing
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(args.rounds):
                for name, way in ways.items():
                    _sync(device)
                    start = time.perf_counter()
                    for _ in range(repeats):
                        way()
                    _sync(device)
                    times[name].append((time.perf_counter() - start) / repeats)
            base = statistics.median(next(iter(times.values())))
            for name, samples in times.items():
                median = statistics.median(samples)
                print(f"| {n:,} | {step} | {name} | {median * 1e6:.1f} | {median / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
