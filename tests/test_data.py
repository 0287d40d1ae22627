"""The data modules: shapes, labels, seeded disjoint splits, loaders; CIFAR-10 from a tiny fake copy in the
real on-disk format (nothing here touches the network)."""

import io
import pickle
import random
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from lightning_mk.experiments.data import CIFAR10DataModule, DigitsDataModule, MNIST1DDataModule, read_cifar10_batch
from lightning_mk.experiments.data import _safe_extract

N_FAKE = 20  # images per fake CIFAR-10 batch file
MARK = (1, 5, 7)  # channel, row, column of the one bright pixel in the first test image


def _write_batch(path, images, labels):
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1), b"labels": labels.tolist(), b"batch_label": b"x"}, f)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """Five data batches, a test batch and the meta file, pickled as in cifar-10-python.tar.gz."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        _write_batch(folder / name, rng.integers(0, 256, (N_FAKE, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, N_FAKE))
    test = np.zeros((N_FAKE, 3072), dtype=np.uint8)
    c, r, col = MARK
    test[0, c * 1024 + r * 32 + col] = 255  # CIFAR rows are the R, G, B planes one after another, row-major
    _write_batch(folder / "test_batch", test, np.arange(N_FAKE) % 10)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": N_FAKE}, f)
    return root


@pytest.fixture
def make(cifar_root):
    def make(name, seed=0, batch_size=8):
        if name == "mnist1d":
            dm = MNIST1DDataModule(num_samples=600, batch_size=batch_size, seed=seed)
        elif name == "digits":
            dm = DigitsDataModule(batch_size=batch_size, seed=seed)
        else:
            dm = CIFAR10DataModule(cifar_root, batch_size=batch_size, seed=seed)
        dm.setup("fit")
        return dm

    return make


MODULES = ["mnist1d", "digits", "cifar10"]


def _samples(dataset):
    """(id of the underlying dataset, index) for each sample, to compare splits across datasets."""
    if isinstance(dataset, Subset):
        return {(id(dataset.dataset), i) for i in dataset.indices}
    return {(id(dataset), i) for i in range(len(dataset))}


@pytest.mark.parametrize("name", MODULES)
def test_samples_have_in_shape_and_labels_in_range(make, name):
    dm = make(name)
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
        assert all(x.shape == dm.in_shape and x.dtype == torch.float32 for x in xs)
        assert all(0 <= int(y) < dm.num_classes for y in ys)
        assert all(torch.isfinite(x).all() for x in xs)


@pytest.mark.parametrize("name", MODULES)
def test_splits_are_disjoint_and_depend_only_on_seed(make, name):
    a, b, other = make(name, seed=0), make(name, seed=0), make(name, seed=1)
    train, val, test = (_samples(s) for s in (a.train_set, a.val_set, a.test_set))
    assert not (train & val or train & test or val & test)
    assert len(val) > 0
    assert a.train_set.indices == b.train_set.indices and a.val_set.indices == b.val_set.indices
    assert torch.equal(a.train_set[0][0], b.train_set[0][0])
    assert a.train_set.indices != other.train_set.indices


@pytest.mark.parametrize("name", MODULES)
def test_loaders_yield_batches_of_batch_size(make, name):
    dm = make(name, batch_size=8)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (8, *dm.in_shape) and y.shape == (8,)
    first = [next(iter(dm.train_dataloader()))[1] for _ in range(2)]
    assert torch.equal(*first)  # the shuffle is seeded too


def test_digits_splits_cover_all_1797_images(make):
    dm = make("digits")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes[1] == int(1797 * 0.1) and sizes[2] == int(1797 * 0.2)
    train = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-4  # standardised on train


def test_mnist1d_keeps_the_global_rngs():
    random.seed(1)
    np.random.seed(1)
    expected = random.random(), np.random.rand()
    random.seed(1)
    np.random.seed(1)
    MNIST1DDataModule(num_samples=600).setup("fit")
    assert (random.random(), np.random.rand()) == expected


def test_cifar_decoding_puts_pixels_at_channel_row_column(cifar_root):
    images, labels = read_cifar10_batch(cifar_root / "cifar-10-batches-py" / "test_batch")
    assert images.shape == (N_FAKE, 3, 32, 32) and images.dtype == torch.uint8
    assert images[0][MARK] == 255 and images[0].sum() == 255
    assert labels.tolist() == [i % 10 for i in range(N_FAKE)]


def test_cifar_module_normalises_the_files_and_keeps_labels(make, cifar_root):
    dm = make("cifar10")
    assert dm.classes == [f"class{i}" for i in range(10)]
    assert len(dm.train_set) + len(dm.val_set) == 5 * N_FAKE and len(dm.test_set) == N_FAKE
    x, y = dm.test_set[0]
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    expected = (-mean / std).view(3, 1, 1).expand(3, 32, 32).clone()
    c = MARK[0]
    expected[MARK] = (1 - mean[c]) / std[c]
    assert torch.allclose(x, expected) and y == 0
    folder = cifar_root / "cifar-10-batches-py"
    batches = [read_cifar10_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    for i in (0, len(dm.val_set) - 1):
        x, y = dm.val_set[i]
        j = dm.val_set.indices[i]
        assert y == labels[j]
        assert torch.allclose(x * std.view(3, 1, 1) + mean.view(3, 1, 1), images[j] / 255, atol=1e-6)


def test_cifar_missing_copy_fails_at_construction_unless_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        CIFAR10DataModule(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(info.value)
    CIFAR10DataModule(tmp_path / "nowhere", download=True)  # the download waits for prepare_data
    assert not (tmp_path / "nowhere").exists()


def test_cifar_incomplete_copy_names_the_missing_file(cifar_root, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "test_batch", "batches.meta"]:
        (folder / name).write_bytes((cifar_root / "cifar-10-batches-py" / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        CIFAR10DataModule(tmp_path)


def _tar(path, names):
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))


@pytest.mark.parametrize("bad", ["../escape", "/tmp/absolute", "cifar-10-batches-py/../../escape"])
def test_extraction_refuses_paths_leaving_the_folder(tmp_path, bad):
    archive = tmp_path / "a.tar.gz"
    _tar(archive, ["cifar-10-batches-py/data_batch_1", bad])
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="refusing"):
        _safe_extract(archive, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir()) and not (tmp_path / "escape").exists()
    _tar(archive, ["cifar-10-batches-py/data_batch_1"])
    _safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "cifar-10-batches-py" / "data_batch_1").read_bytes() == b"ok"


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MNIST1DDataModule(val_fraction=1.5), "val_fraction must be in (0, 1), got 1.5"),
        (lambda: MNIST1DDataModule(num_samples=50), "num_samples must be an int >= 100, got 50"),
        (lambda: DigitsDataModule(test_fraction=0), "test_fraction must be in (0, 1), got 0"),
        (lambda: DigitsDataModule(val_fraction=0.5, test_fraction=0.5), "val_fraction + test_fraction must be < 1"),
        (lambda: DigitsDataModule(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (lambda: DigitsDataModule(seed=1.0), "seed must be an int, got 1.0"),
        (lambda: CIFAR10DataModule("x", download=True, num_workers=-1), "num_workers must be an int >= 0, got -1"),
        (lambda: CIFAR10DataModule("x", download=True, val_fraction=0), "val_fraction must be in (0, 1), got 0"),
    ],
)
def test_bad_arguments_are_named_with_the_allowed_values(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value)
