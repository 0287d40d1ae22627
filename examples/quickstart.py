"""Train an MLP on MNIST-1D (generated locally) with Majority Kernels, k=4; save and test the small model.

    python examples/quickstart.py [--epochs 20] [--k 4] [--scheme select] [--out runs/quickstart]
"""

import argparse
import os

import lightning.pytorch as pl
import torch

from lightning_mk import MajorityKernelCallback
from lightning_mk.experiments.data import MNIST1DDataModule
from lightning_mk.experiments.models import MLP, Classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--scheme", default="select")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    data = MNIST1DDataModule(seed=args.seed)
    model = Classifier(MLP(data.in_shape, data.num_classes, n=128), data.num_classes)
    os.makedirs(args.out, exist_ok=True)
    small_path = os.path.join(args.out, "small_model.pt")
    mk = MajorityKernelCallback(k=args.k, scheme=args.scheme, seed=args.seed, save_path=small_path)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[mk], default_root_dir=args.out, deterministic=True)
    trainer.fit(model, data)

    # The saved file is the user's own architecture: load it into a fresh, unmodified Classifier.
    small = Classifier(MLP(data.in_shape, data.num_classes, n=128), data.num_classes)
    small.load_state_dict(torch.load(small_path, weights_only=True), strict=True)
    n_params = sum(p.numel() for p in small.parameters())
    (result,) = pl.Trainer(logger=False, enable_progress_bar=False).test(small, data, verbose=False)
    print(f"small model ({n_params:,} parameters, trained with k={args.k} copies): test accuracy {result['test/acc']:.4f}")
    print(f"saved to {small_path}")


if __name__ == "__main__":
    main()
