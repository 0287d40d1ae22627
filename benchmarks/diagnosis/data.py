"""MNIST-1D tensors for the diagnosis, cached in /tmp. Generated locally by the mnist1d package through
lightning_mk.experiments.data.MNIST1DDataModule (80 % train / 20 % test; 10 % of train held out as
validation with seed 0, as in the quality study)."""
import os

import torch


def load(num_samples: int = 5000) -> dict:
    path = f"/tmp/mk_diag_mnist1d_{num_samples}.pt"
    if os.path.exists(path):
        return torch.load(path)
    from lightning_mk.experiments.data import MNIST1DDataModule

    dm = MNIST1DDataModule(num_samples=num_samples, seed=0)
    dm.setup()
    out = {}
    for name, ds in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        if hasattr(ds, "indices"):  # a Subset of the train TensorDataset
            x, y = ds.dataset.tensors
            idx = torch.tensor(ds.indices)
            out[name] = (x[idx], y[idx])
        else:
            out[name] = ds.tensors
    torch.save(out, path)
    return out
