"""Majority Kernels with Lightning Fabric (no Trainer): DDP on CPU processes, the raw-PyTorch API.

    python examples/fabric_ddp.py [--devices 2] [--epochs 5] [--k 4] [--out runs/fabric]

`apply_majority_kernels` rewrites the network before the optimizer is built; every training-mode
forward draws new coefficients, identical on every rank (keyed by seed, step and kernel);
`collapsed_state_dict` gives the plain network's state_dict, written once by rank zero.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch.utils.data import DataLoader

from lightning_mk import apply_majority_kernels, collapsed_state_dict
from lightning_mk.atomic import write_atomically
from lightning_mk.experiments.data import MNIST1DDataModule
from lightning_mk.experiments.models import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--out", default="runs/fabric")
    args = parser.parse_args()

    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    fabric.seed_everything(0)
    data = MNIST1DDataModule(num_samples=args.num_samples)
    data.setup("fit")
    net = apply_majority_kernels(MLP(data.in_shape, data.num_classes, n=64), k=args.k, scheme="select", seed=0).module
    model, optimizer = fabric.setup(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    train = fabric.setup_dataloaders(DataLoader(data.train_set, batch_size=128, shuffle=True))

    for _ in range(args.epochs):
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            fabric.backward(F.cross_entropy(model(x), y))
            optimizer.step()

    small_state = collapsed_state_dict(net)
    checksum = sum(float(v.double().sum()) for v in small_state.values())
    print(f"rank {fabric.global_rank}: plain-model checksum {checksum:.10f}", flush=True)
    path = os.path.join(args.out, "small_model.pt")
    if fabric.global_rank == 0:
        os.makedirs(args.out, exist_ok=True)
        write_atomically(path, lambda f: torch.save(small_state, f))
    fabric.barrier()

    if fabric.global_rank == 0:
        small = MLP(data.in_shape, data.num_classes, n=64)
        small.load_state_dict(torch.load(path, weights_only=True), strict=True)
        small.eval()
        x, y = data.test_set.tensors
        with torch.no_grad():
            accuracy = (small(x).argmax(1) == y).float().mean().item()
        print(f"small model ({sum(p.numel() for p in small.parameters()):,} parameters): test accuracy {accuracy:.4f}; saved to {path}")
    fabric.barrier()  # every rank tears down together: rank zero hosts the store the others still talk to
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo's threads can abort the process at interpreter exit


if __name__ == "__main__":
    main()
