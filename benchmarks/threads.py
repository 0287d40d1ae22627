"""Median training-step time of a small MLP with 1 or 2 torch threads: python benchmarks/threads.py 2

Run it on an idle machine and again while other processes keep the cores busy: with every core taken,
torch's threads wait on each other, and one thread per process is much faster (README, "The tests")."""

import sys
import time

import torch
from torch import nn

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))


def step() -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()


for _ in range(20):  # warm-up
    step()
times = []
for _ in range(200):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(f"threads={sys.argv[1]}: median step {1000 * sorted(times)[len(times) // 2]:.2f} ms")
