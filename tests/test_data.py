"""Tests for pyro_vae.data: IDX reading, dataset lookup, binarization, device minibatches."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae import data
from pyro_vae.data import (
    SYSTEM_DATA_DIRS,
    DeviceBatches,
    load_dataset,
    read_idx,
)
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.names import BINARIZATIONS, LIKELIHOODS, check_binarization, default_binarization

from .idx_files import N_TEST, N_TRAIN, fake_arrays, write_dataset, write_idx


def assert_matches(ds: data.ImageDataset, arrays: dict[str, np.ndarray]) -> None:
    for field, array in arrays.items():
        tensor = getattr(ds, field)
        assert tensor.dtype == (torch.uint8 if field.endswith("images") else torch.int64)
        assert np.array_equal(tensor.numpy(), array[:, None] if field.endswith("images") else array)


@pytest.fixture(autouse=True)
def empty_default_data_dir(tmp_path, monkeypatch):
    """Keep a user's ~/.cache/pyro-vae/data out of the lookup."""
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path / "default-data-dir"))


# --- read_idx ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (3, 4, 5, 6)])
def test_read_idx_round_trips(tmp_path, gz, shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    tensor = read_idx(write_idx(tmp_path / "x-idx", array, gz))
    assert tensor.dtype == torch.uint8
    assert np.array_equal(tensor.numpy(), array)


def _truncated(path: Path) -> Path:
    full = write_idx(path, np.zeros((4, 28, 28), np.uint8), gz=False)
    full.write_bytes(full.read_bytes()[:-100])
    return full


def _bad_magic(path: Path) -> Path:
    full = write_idx(path, np.zeros((4, 28, 28), np.uint8), gz=False)
    full.write_bytes(b"\x1f\x8b" + full.read_bytes()[2:])  # e.g. a gzip file saved without .gz
    return full


def _not_gzip(path: Path) -> Path:
    path = path.with_name(path.name + ".gz")
    path.write_bytes(b"<html>404 Not Found</html>")  # a failed download saved as .gz
    return path


def _truncated_gzip(path: Path) -> Path:
    full = write_idx(path, np.ones((4, 28, 28), np.uint8), gz=True)
    full.write_bytes(full.read_bytes()[:30])
    return full


def _flipped_gzip(path: Path) -> Path:
    full = write_idx(path, np.random.default_rng(0).integers(0, 256, (4, 28, 28), np.uint8), gz=True)
    raw = bytearray(full.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 20] = bytes(20)
    full.write_bytes(bytes(raw))
    return full


@pytest.mark.parametrize(
    "corrupt, words",
    [
        (_truncated, "payload"),
        (_bad_magic, "magic"),
        (_not_gzip, "gzip"),
        (_truncated_gzip, "gzip"),
        (_flipped_gzip, "gzip"),
    ],
)
def test_read_idx_corrupt_files_raise_data_error_naming_file(tmp_path, corrupt, words):
    path = corrupt(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert path.name in message and words in message and "re-download" in message


# --- load_dataset --------------------------------------------------------------------------


def test_torchvision_layout_reads_what_the_real_torchvision_class_reads(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    arrays = write_dataset(tmp_path / "FashionMNIST" / "raw", gz=False)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert_matches(ds, arrays)
    assert ds.name == "fashion_mnist" and str(tmp_path / "FashionMNIST" / "raw") in ds.source
    for train in (True, False):  # torchvision's own loader, as a yardstick, reads the same arrays
        theirs = torchvision.datasets.FashionMNIST(root=str(tmp_path), train=train, download=False)
        split = "train" if train else "test"
        assert torch.equal(theirs.data.unsqueeze(1), getattr(ds, f"{split}_images")) and torch.equal(theirs.targets, getattr(ds, f"{split}_labels"))


def test_an_explicit_data_dir_is_used_or_refused_never_replaced(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_dataset(system, gz=True)
    monkeypatch.setitem(SYSTEM_DATA_DIRS, "fashion_mnist", (system,))
    assert str(system) in load_dataset("fashion_mnist", data_dir=None).source
    for wrong in (tmp_path / "misspelled", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(DataError, match="not found") as info:
            load_dataset("fashion_mnist", data_dir=wrong)
        assert str(system) not in str(info.value)
    with pytest.raises(DataError, match="empty"):
        load_dataset("fashion_mnist", data_dir="  ")


def test_a_relative_data_dir_is_resolved_and_the_fingerprint_names_the_content(tmp_path, monkeypatch):
    write_dataset(tmp_path / "plain", gz=False, seed=1)
    write_dataset(tmp_path / "gz", gz=True, seed=1)
    write_dataset(tmp_path / "other", gz=False, seed=2)
    monkeypatch.chdir(tmp_path)
    plain = load_dataset("mnist", data_dir="plain")
    assert str(tmp_path / "plain") in plain.source
    assert plain.fingerprint() == load_dataset("mnist", data_dir="gz").fingerprint()
    assert plain.fingerprint() != load_dataset("mnist", data_dir="other").fingerprint()


def test_a_gzip_bomb_is_refused_from_its_header_before_allocating(tmp_path):
    import gzip

    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + (4_000_000).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    path.write_bytes(gzip.compress(header + bytes(1 << 20)))
    with pytest.raises(DataError, match="announces"):
        read_idx(path)


def test_torchvision_layout_with_corrupt_file_names_it(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_dataset(raw, gz=False)
    _truncated(raw / "t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("gz, kind", [(True, "gzipped"), (False, "plain")])
def test_load_flat_idx_files(tmp_path, gz, kind):
    arrays = write_dataset(tmp_path, gz=gz, seed=3)
    ds = load_dataset("kmnist", data_dir=tmp_path)
    assert_matches(ds, arrays)
    assert kind in ds.source and str(tmp_path) in ds.source and "torchvision" not in ds.source


def test_load_idx_files_in_named_subdirectory(tmp_path):
    arrays = write_dataset(tmp_path / "mnist", gz=True, seed=4)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert_matches(ds, arrays)
    assert str(tmp_path / "mnist") in ds.source


def test_default_data_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    arrays = write_dataset(tmp_path, gz=True, seed=5)
    assert_matches(load_dataset("mnist"), arrays)


def test_missing_dataset_lists_places_and_remedies(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    for place in (tmp_path, tmp_path / "mnist", tmp_path / "MNIST" / "raw"):
        assert str(place) in message
    assert "--download" in message and "--data-dir" in message
    assert "apt-get" not in message  # no Debian package for MNIST


def test_missing_fashion_mnist_mentions_debian_package(tmp_path, monkeypatch):
    nowhere = tmp_path / "no-system-dir"
    monkeypatch.setitem(SYSTEM_DATA_DIRS, "fashion_mnist", (nowhere,))
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_dataset("fashion_mnist")
    message = str(info.value)
    assert str(nowhere) in message and str(tmp_path) in message
    assert "--download" in message and "apt-get install dataset-fashion-mnist" in message


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in ("mnist", "fashion_mnist", "kmnist", "cifar10", "svhn", "folder"))


def test_label_count_mismatch_raises(tmp_path):
    write_dataset(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(N_TRAIN - 1, np.uint8), gz=False)
    with pytest.raises(DataError, match="labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_wrong_image_size_raises(tmp_path):
    write_dataset(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((N_TEST, 32, 32), np.uint8), gz=False)
    with pytest.raises(DataError, match="28, 28"):
        load_dataset("mnist", data_dir=tmp_path)


DEBIAN_DIR = SYSTEM_DATA_DIRS["fashion_mnist"][0]


@pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_DIR} missing)",
)
def test_finds_debian_fashion_mnist_without_data_dir():
    ds = load_dataset("fashion_mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    assert set(ds.train_labels.unique().tolist()) == set(range(10))
    assert str(DEBIAN_DIR) in ds.source


# --- binarization --------------------------------------------------------------------------


def batches(binarization="none", seed=0, n=N_TRAIN, batch_size=16, **kwargs) -> DeviceBatches:
    """DeviceBatches whose label i marks example i, so batches can be matched to examples."""
    images = torch.from_numpy(fake_arrays()["train_images"][:n].copy())
    return DeviceBatches(images, torch.arange(n), batch_size, binarization=binarization, seed=seed, **kwargs)


def epoch_by_example(db: DeviceBatches, epoch: int) -> torch.Tensor:
    """An epoch's pixels concatenated and put back in example order."""
    xs, ys = zip(*db.epoch(epoch))
    return torch.cat(xs)[torch.cat(ys).argsort()]


def intensities() -> torch.Tensor:
    """The pixels ``batches`` serves, as float intensities in [0, 1], shape (N, 784)."""
    return torch.from_numpy(fake_arrays()["train_images"]).float().flatten(1) / 255


def test_none_keeps_intensities():
    db = batches("none")
    expected = intensities()
    assert torch.equal(epoch_by_example(db, 0), expected)
    assert torch.equal(db.full(), expected)


def test_threshold_is_x_above_half():
    assert torch.equal(batches("threshold").full(), (intensities() > 0.5).float())


@pytest.mark.parametrize("binarization", ["threshold", "static", "dynamic"])
def test_binarized_values_are_zero_or_one(binarization):
    db = batches(binarization)
    for x in (epoch_by_example(db, 0), db.full()):
        assert x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}


def test_static_is_fixed_across_epochs_and_runs():
    db = batches("static", seed=7)
    first = epoch_by_example(db, 0)
    assert torch.equal(first, epoch_by_example(db, 5))
    assert torch.equal(first, db.full())
    assert torch.equal(first, epoch_by_example(batches("static", seed=7), 3))  # a new run, same seed
    assert not torch.equal(first, epoch_by_example(batches("static", seed=8), 0))


def test_dynamic_differs_across_epochs_but_repeats_for_same_seed_and_epoch():
    db = batches("dynamic", seed=7)
    e2 = epoch_by_example(db, 2)
    assert not torch.equal(e2, epoch_by_example(db, 3))
    assert torch.equal(e2, epoch_by_example(db, 2))
    assert torch.equal(e2, epoch_by_example(batches("dynamic", seed=7), 2))  # resumed run at epoch 2
    assert not torch.equal(e2, epoch_by_example(batches("dynamic", seed=8), 2))


def test_dynamic_evaluation_draw_is_fixed():
    db = batches("dynamic", seed=7, shuffle=False)
    assert torch.equal(db.full(), db.full())
    assert torch.equal(db.full(), batches("dynamic", seed=7).full())
    assert torch.equal(torch.cat([x for x, _ in db.eval_batches()]), db.full())


def test_dynamic_mean_matches_intensities():
    epochs = 400
    db = batches("dynamic", seed=11, batch_size=N_TRAIN)
    p = intensities()
    mean = torch.stack([epoch_by_example(db, e) for e in range(epochs)]).mean(0)
    # Each pixel's mean of 400 Bernoulli(p) draws has standard error sqrt(p(1-p)/400) <= 0.025.
    # Over 50*784 = 39,200 pixels, a 6-SE bound (two-sided tail 2e-9 each) fails with probability
    # < 1e-4 overall; the grand mean over 15.7M draws has SE <= 0.5/sqrt(15.7e6) ~ 1.3e-4.
    se = (p * (1 - p) / epochs).sqrt()
    assert ((mean - p).abs() <= 6 * se + 1e-6).all()
    assert abs(mean.mean() - p.mean()) < 6 * 0.5 / (p.numel() * epochs) ** 0.5


# --- DeviceBatches -------------------------------------------------------------------------


def test_every_example_once_per_epoch_and_order_depends_on_epoch():
    db = batches(seed=3)
    orders = {e: torch.cat([y for _, y in db.epoch(e)]) for e in range(3)}
    for order in orders.values():
        assert torch.equal(order.sort().values, torch.arange(N_TRAIN))
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(orders[1], torch.cat([y for _, y in batches(seed=3).epoch(1)]))
    assert not torch.equal(orders[1], torch.cat([y for _, y in batches(seed=4).epoch(1)]))


def test_no_shuffle_keeps_stored_order():
    db = batches(shuffle=False)
    for e in range(2):
        assert torch.equal(torch.cat([y for _, y in db.epoch(e)]), torch.arange(N_TRAIN))


@pytest.mark.parametrize("flatten, shape", [(True, (16, 784)), (False, (16, 1, 28, 28))])
def test_batch_shapes(flatten, shape, device):
    db = batches(flatten=flatten, device=device)
    x, y = next(iter(db.epoch(0)))
    assert x.shape == shape and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.int64
    assert x.device == y.device == device
    assert db.full().shape == (N_TRAIN, *shape[1:])


def test_drop_last():
    kept = batches(batch_size=16)
    dropped = batches(batch_size=16, drop_last=True)
    assert len(kept) == 4 and [len(y) for _, y in kept.epoch(0)] == [16, 16, 16, 2]
    assert len(dropped) == 3 and [len(y) for _, y in dropped.epoch(0)] == [16, 16, 16]
    with pytest.raises(ConfigError):
        batches(batch_size=N_TRAIN + 1, drop_last=True)


def test_rejects_bad_inputs():
    with pytest.raises(ConfigError, match="binarization"):
        batches("sometimes")
    with pytest.raises(DataError):
        DeviceBatches(torch.zeros(4, 28, 28), torch.arange(4), 2)  # float images
    with pytest.raises(DataError):
        DeviceBatches(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.arange(3), 2)


# --- likelihood / binarization pairing -------------------------------------------------------


def test_each_likelihood_has_its_default_binarization():
    assert default_binarization("bernoulli") == "dynamic"
    assert default_binarization("continuous_bernoulli") == "none"
    assert default_binarization("normal") == "none"
    assert all(default_binarization(name) == "none" for name in LIKELIHOODS if name.startswith("discretized"))


def test_the_bernoulli_likelihood_refuses_continuous_pixels():
    with pytest.raises(DataError) as info:
        check_binarization("bernoulli", "none")
    message = str(info.value)
    assert "--binarize" in message and "continuous_bernoulli" in message and "normal" in message
    for binarization in ("threshold", "static", "dynamic"):
        check_binarization("bernoulli", binarization)
    with pytest.raises(DataError):
        check_binarization("bernoulli", "dequantize")
    for binarization in BINARIZATIONS:
        check_binarization("normal", binarization)
        check_binarization("continuous_bernoulli", binarization)
