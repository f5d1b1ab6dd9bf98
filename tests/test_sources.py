"""Your own data: image folders (PNG, JPEG, grey, RGB, class subfolders, train/test), numpy arrays in
every layout, CIFAR-10's pickled batches and SVHN's .mat files, all written here in their real formats;
and every bad input refused with one line naming the file and the fix."""

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_vae.data import SPLIT_SEED, load_dataset
from pyro_vae.errors import ConfigError, DataError


def save(path: Path, pixels: np.ndarray, **options) -> None:
    """``pixels`` (H, W) grey or (H, W, 3) RGB uint8 as an image file, its format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)


def random_pixels(rng, n, shape):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def pixels_of(dataset, split="train"):
    return getattr(dataset, f"{split}_images").numpy()


# --- folders ---------------------------------------------------------------------------------


def test_an_rgb_png_folder_with_class_subfolders_keeps_pixels_labels_and_a_seeded_split(tmp_path):
    rng = np.random.default_rng(0)
    written = {}  # relative path -> (pixels (3, H, W), label)
    for label, name in enumerate(("cats", "dogs")):
        for i, pixels in enumerate(random_pixels(rng, 10, (8, 12, 3))):
            save(tmp_path / name / f"{i:02d}.png", pixels)
            written[f"{name}/{i:02d}.png"] = (pixels.transpose(2, 0, 1), label)
    ds = load_dataset("folder", tmp_path, test_fraction=0.2)
    assert ds.image_shape == (3, 8, 12) and ds.classes == ("cats", "dogs")
    assert (len(ds.train_images), len(ds.test_images)) == (16, 4)
    # the held-out images are those a permutation seeded with SPLIT_SEED puts first, in file order
    order = np.random.default_rng(SPLIT_SEED).permutation(20)
    names = sorted(written)
    held_out = [names[i] for i in np.sort(order[:4])]
    for k, name in enumerate(held_out):
        pixels, label = written[name]
        assert np.array_equal(pixels_of(ds, "test")[k], pixels) and ds.test_labels[k] == label
    kept = [n for n in names if n not in held_out]
    assert np.array_equal(pixels_of(ds), np.stack([written[n][0] for n in kept]))
    assert ds.train_labels.tolist() == [written[n][1] for n in kept]
    assert load_dataset("folder", tmp_path, test_fraction=0.2).fingerprint() == ds.fingerprint()


def test_a_grey_jpeg_folder_with_train_and_test_gives_one_channel_as_pil_decodes_it(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("test", 3)):
        for i, pixels in enumerate(random_pixels(rng, n, (16, 16))):
            save(tmp_path / split / f"{i}.jpg", pixels, quality=90)
    ds = load_dataset("folder", tmp_path)
    assert ds.image_shape == (1, 16, 16) and ds.classes is None
    assert (len(ds.train_images), len(ds.test_images)) == (6, 3) and not ds.train_labels.any()
    decoded = np.asarray(Image.open(tmp_path / "test" / "2.jpg"))
    assert np.array_equal(pixels_of(ds, "test")[2, 0], decoded)


def test_one_colour_image_makes_every_image_rgb_with_grey_ones_repeated(tmp_path):
    rng = np.random.default_rng(2)
    grey = random_pixels(rng, 1, (8, 8))[0]
    save(tmp_path / "a.png", grey)
    save(tmp_path / "b.png", random_pixels(rng, 1, (8, 8, 3))[0])
    save(tmp_path / "c.png", grey)
    ds = load_dataset("folder", tmp_path, test_fraction=0.34)
    both = np.concatenate([pixels_of(ds), pixels_of(ds, "test")])
    assert ds.image_shape == (3, 8, 8)
    assert sum(np.array_equal(image, np.stack([grey] * 3)) for image in both) == 2


def test_image_size_scales_to_cover_and_crops_the_centre(tmp_path):
    wide = np.zeros((16, 32, 3), np.uint8)  # black quarters left and right, white half in the middle
    wide[:, 8:24] = 255
    for i in range(4):
        save(tmp_path / f"wide{i}.png", wide)
    save(tmp_path / "big.png", np.full((32, 32, 3), 77, np.uint8))  # another size: scaled by 1/2
    ds = load_dataset("folder", tmp_path, image_size=(16, 16), test_fraction=0.2)
    images = np.concatenate([pixels_of(ds), pixels_of(ds, "test")])
    assert ds.image_shape == (3, 16, 16)
    assert sorted(np.unique(image).tolist() for image in images) == [[77]] + [[255]] * 4
    other = load_dataset("folder", tmp_path, image_size=(8, 8), test_fraction=0.2)
    assert other.fingerprint() != ds.fingerprint()


def test_the_fingerprint_covers_file_names_and_bytes(tmp_path):
    rng = np.random.default_rng(3)
    for i, pixels in enumerate(random_pixels(rng, 5, (8, 8))):
        save(tmp_path / f"{i}.png", pixels)
    before = load_dataset("folder", tmp_path, test_fraction=0.2).fingerprint()
    (tmp_path / "4.png").rename(tmp_path / "x4.png")  # same pixels, same order, another name
    renamed = load_dataset("folder", tmp_path, test_fraction=0.2)
    assert renamed.fingerprint() != before
    pixels = np.asarray(Image.open(tmp_path / "x4.png"))
    save(tmp_path / "x4.png", pixels, compress_level=0)  # same pixels, other bytes
    assert load_dataset("folder", tmp_path, test_fraction=0.2).fingerprint() != renamed.fingerprint()


def truncated_png(path):
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def folder_with(folder, n=4, shape=(8, 8)):
    """``folder`` holding ``n`` random grey PNG images 0.png, 1.png, ..."""
    for i, pixels in enumerate(random_pixels(np.random.default_rng(4), n, shape)):
        save(folder / f"{i}.png", pixels)
    return folder


def symlink_loop(tmp_path):
    folder = folder_with(tmp_path / "images")
    os.symlink(folder, folder / "again")
    return folder / "again"


def a_file(tmp_path, name, text):
    (folder_with(tmp_path / "images") / name).write_text(text)
    return tmp_path / "images" / name


def an_empty_split(tmp_path):
    folder_with(tmp_path / "images" / "train", 3)
    (tmp_path / "images" / "test").mkdir()
    return tmp_path / "images" / "test"


def train_without_test(tmp_path):
    folder_with(tmp_path / "images" / "train", 3)
    return tmp_path / "images" / "train"


def empty(tmp_path):
    (tmp_path / "images").mkdir()
    return tmp_path / "images"


def loose_and_classified(tmp_path):
    save(folder_with(tmp_path / "images") / "cls" / "a.png", np.zeros((8, 8), np.uint8))
    return tmp_path / "images" / "cls" / "a.png"


BAD_FOLDERS = {
    "truncated": (lambda t: truncated_png(folder_with(t / "images") / "4.png"), "cannot be decoded"),
    "not an image": (lambda t: a_file(t, "notes.txt", "hello"), "not a PNG or JPEG"),
    "text named png": (lambda t: a_file(t, "fake.png", "hello"), "not an image (no PNG or JPEG data in it)"),
    "empty": (empty, "holds no images"),
    "symlink loop": (symlink_loop, "symbolic link loop"),
    "empty split": (an_empty_split, "holds no images"),
    "train without test": (train_without_test, "no test/ beside it"),
    "loose and classified": (loose_and_classified, "class subfolder"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_a_bad_folder_is_refused_in_one_line_naming_the_file(tmp_path, case):
    make, words = BAD_FOLDERS[case]
    named = make(tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset("folder", tmp_path / "images")
    message = str(info.value)
    assert words in message and str(named) in message and "\n" not in message, message


def test_mixed_sizes_are_refused_with_the_count_of_each(tmp_path):
    folder = folder_with(tmp_path / "images", n=3)
    save(folder / "odd.png", np.zeros((16, 8), np.uint8))
    with pytest.raises(DataError, match=r"2 sizes: 3 of 8x8 .*, 1 of 16x8 .*odd\.png.*--image-size H W"):
        load_dataset("folder", folder)


@pytest.mark.parametrize("fraction", [0.9, 0.05])
def test_a_test_fraction_that_leaves_a_split_empty_is_refused(tmp_path, fraction):
    folder = folder_with(tmp_path / "images", n=4)
    with pytest.raises(DataError, match=r"gives \d test and \d training images; pass a --test-fraction"):
        load_dataset("folder", folder, test_fraction=fraction)


# --- arrays ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, to_file, channels",
    [
        (None, lambda x: x[:, 0], 1),  # (N, H, W)
        (None, lambda x: x.transpose(0, 2, 3, 1), 3),  # (N, H, W, C)
        (None, lambda x: x, 3),  # (N, C, H, W)
        (None, lambda x: x, 1),  # (N, 1, H, W)
        ("NHWC", lambda x: x.transpose(0, 2, 3, 1), 3),
        ("NCHW", lambda x: x, 3),
    ],
)
def test_a_npy_file_in_every_layout_gives_the_same_images(tmp_path, layout, to_file, channels):
    images = random_pixels(np.random.default_rng(5), 20, (channels, 8, 6))
    np.save(tmp_path / "x.npy", to_file(images))
    ds = load_dataset("array", tmp_path / "x.npy", layout=layout)
    both = np.concatenate([pixels_of(ds), pixels_of(ds, "test")])
    order = np.random.default_rng(SPLIT_SEED).permutation(20)
    expected = np.concatenate([images[np.sort(order[2:])], images[np.sort(order[:2])]])
    assert ds.image_shape == (channels, 8, 6) and np.array_equal(both, expected)


def test_a_npz_file_with_train_test_and_labels_keeps_its_splits(tmp_path):
    rng = np.random.default_rng(6)
    train, test = random_pixels(rng, 7, (8, 8, 3)), random_pixels(rng, 3, (8, 8, 3))
    np.savez(tmp_path / "d.npz", train=train, test=test, train_labels=np.arange(7), test_labels=np.array([2, 1, 0]))
    ds = load_dataset("array", tmp_path / "d.npz")
    assert np.array_equal(pixels_of(ds), train.transpose(0, 3, 1, 2))
    assert np.array_equal(pixels_of(ds, "test"), test.transpose(0, 3, 1, 2))
    assert ds.train_labels.tolist() == list(range(7)) and ds.test_labels.tolist() == [2, 1, 0]
    np.savez(tmp_path / "one.npz", images=train, labels=np.arange(7))
    assert len(load_dataset("array", tmp_path / "one.npz", test_fraction=0.3).test_images) == 2


BAD_ARRAYS = {
    "ambiguous": (lambda: {"images": np.zeros((4, 3, 8, 3), np.uint8)}, "--layout NCHW or --layout NHWC"),
    "no channel axis": (lambda: {"images": np.zeros((4, 5, 8, 7), np.uint8)}, "neither axis 1"),
    "float": (lambda: {"images": np.zeros((4, 8, 8), np.float32)}, "float32, not uint8"),
    "flat": (lambda: {"images": np.zeros((4, 64), np.uint8)}, "(N, H, W)"),
    "labels": (lambda: {"images": np.zeros((4, 8, 8), np.uint8), "labels": np.arange(3)}, "4 non-negative integer"),
    "keys": (lambda: {"pictures": np.zeros((4, 8, 8), np.uint8), "more": np.zeros(4)}, "name them train"),
    "test shape": (lambda: {"train": np.zeros((4, 8, 8), np.uint8), "test": np.zeros((2, 9, 8), np.uint8)},
                   "one image size"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_a_bad_array_is_refused_in_one_line_naming_the_file(tmp_path, case):
    make, words = BAD_ARRAYS[case]
    np.savez(tmp_path / "bad.npz", **make())
    with pytest.raises(DataError) as info:
        load_dataset("array", tmp_path / "bad.npz")
    message = str(info.value)
    assert words in message and str(tmp_path / "bad.npz") in message and "\n" not in message, message


def test_an_option_of_another_source_is_refused_by_the_command_line(tmp_path, capsys):
    from pyro_vae.cli import main

    assert main(["train", "--dataset", "mnist", "--image-size", "8", "8", "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "--image-size is for --dataset folder; this run's dataset is mnist: leave --image-size out" in error
    assert not (tmp_path / "run").exists()


def test_an_unreadable_array_file_and_misplaced_options_are_refused(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"x\.npy: cannot be read as a numpy \.npy file"):
        load_dataset("array", tmp_path / "x.npy")
    with pytest.raises(DataError, match="pass --data-dir"):
        load_dataset("array")
    with pytest.raises(ConfigError, match="leave it out"):
        load_dataset("array", tmp_path / "x.npy", image_size=(8, 8))


# --- CIFAR-10 and SVHN in their own formats ---------------------------------------------------


def write_cifar10(folder: Path, per_batch=4, seed=7):
    """CIFAR-10's python batches as the real files hold them: dicts of uint8 (N, 3072) rows and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = random_pixels(rng, per_batch, (3072,)), rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f, protocol=2)
        written[name] = (data.reshape(-1, 3, 32, 32), labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f, protocol=2)
    return written


def test_cifar10_batches_are_read_as_torchvision_lays_them_out(tmp_path):
    written = write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", tmp_path)
    train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    assert np.array_equal(pixels_of(ds), np.concatenate([images for images, _ in train]))
    assert ds.train_labels.tolist() == sum((labels for _, labels in train), [])
    assert np.array_equal(pixels_of(ds, "test"), written["test_batch"][0])
    assert ds.classes[3] == "class3" and ds.image_shape == (3, 32, 32)


def test_a_pickle_posing_as_a_cifar_batch_cannot_run_code(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(type("Evil", (), {"__reduce__": lambda self: (os.mkdir, (str(marker),))})(), f)
    with pytest.raises(DataError, match=r"test_batch: not a readable CIFAR-10 batch \(it asks for posix\.mkdir"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_svhn_mat_files_are_read_with_label_10_as_digit_0(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(8)
    written = {}
    for split, n in (("train", 5), ("test", 3)):
        x, y = random_pixels(rng, 1, (32, 32, 3, n))[0], rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0] = 10
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y[:, 0])
    ds = load_dataset("svhn", tmp_path)
    for split, (x, y) in written.items():
        assert np.array_equal(pixels_of(ds, split), x.transpose(3, 2, 0, 1))
        assert getattr(ds, f"{split}_labels").tolist() == (y % 10).tolist() and y[0] == 10
    assert ds.test_labels[0] == 0


def test_cifar10_not_found_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"not found: no data_batch_1 to 5 and test_batch in .*--download"):
        load_dataset("cifar10", tmp_path)


# --- minibatches of colour images -------------------------------------------------------------


def test_colour_batches_keep_their_channels_flat_or_not():
    from pyro_vae.data import DeviceBatches

    images = torch.from_numpy(random_pixels(np.random.default_rng(9), 6, (3, 4, 4)))
    flat = DeviceBatches(images, torch.arange(6), 3, shuffle=False)
    shaped = DeviceBatches(images, torch.arange(6), 3, shuffle=False, flatten=False)
    (x, _), (y, _) = next(flat.epoch(0)), next(shaped.epoch(0))
    assert x.shape == (3, 48) and y.shape == (3, 3, 4, 4) and flat.image_shape == (3, 4, 4)
    assert torch.equal(x, y.flatten(1)) and torch.equal(y, images[:3].float() / 255)


# --- training on them, from the library and the command line ----------------------------------


def colour_folder(folder, n=24, side=8):
    """Two classes of RGB images, reddish and bluish."""
    rng = np.random.default_rng(10)
    for i, pixels in enumerate(random_pixels(rng, n, (side, side, 3))):
        pixels[..., 0 if i % 2 else 2] = 230
        save(folder / ("red" if i % 2 else "blue") / f"{i}.png", pixels)
    return folder


def test_colour_images_are_binarized_only_when_asked(tmp_path, capsys):
    from pyro_vae.cli import main
    from pyro_vae.config import TrainConfig
    from pyro_vae.train import Trainer

    folder = colour_folder(tmp_path / "images")
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "colour images" in error and "--binarize dynamic" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    config = TrainConfig(dataset="folder", data_dir=str(folder), binarize="dynamic", z_dim=2, hidden=(8,))
    with Trainer(config, tmp_path / "asked", progress=False) as trainer:
        assert trainer.config.image_shape == (3, 8, 8) and trainer.vae.x_shape == (192,)  # the mlp: flat C*H*W
        assert next(trainer.train_batches.epoch(0))[0].shape == (22, 192)  # 24 images, 2 held out


@pytest.mark.slow  # about 8 s: a training, an evaluation and a sampling
def test_the_command_line_trains_evaluates_and_samples_a_folder_of_colour_images(tmp_path, capsys):
    import json

    from pyro_vae.cli import main

    folder, run = colour_folder(tmp_path / "images"), tmp_path / "run"
    train = ["train", "--dataset", "folder", "--data-dir", str(folder), "--likelihood", "discretized_logistic"]
    options = ["--architecture", "conv", "--epochs", "1", "--batch-size", "8", "--z-dim", "2", "--step", "eager"]
    assert main([*train, *options, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"data: image folder {folder}" in out and "done: 1 epochs" in out
    assert json.loads((run / "config.json").read_text())["image_shape"] == [3, 8, 8]
    for figure in ("reconstructions.png", "samples.png", "manifold.png"):
        rgb = np.asarray(Image.open(run / figure).convert("RGB")).astype(int)
        assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 50, f"{figure} is not in colour"
    assert main(["evaluate", str(run), "--num-samples", "30", "--no-progress"]) == 0
    assert "bits/dim on 8-bit pixels" in capsys.readouterr().out
    record = json.loads((run / "evaluation.json").read_text())
    assert record["bits_per_dim"] == pytest.approx(-record["test_log_likelihood"] / (3 * 8 * 8 * np.log(2)), rel=1e-9)
    assert main(["sample", str(run), "--num", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").mode in ("RGB", "RGBA")


@pytest.mark.slow  # about 10 s: three short trainings
def test_a_run_on_a_folder_resumes_bit_for_bit_and_refuses_a_changed_folder(tmp_path, capsys):
    import json

    from pyro_vae.cli import main

    folder = colour_folder(tmp_path / "images")
    train = ["train", "--dataset", "folder", "--data-dir", str(folder), "--likelihood", "discretized_logistic"]
    train += ["--batch-size", "8", "--z-dim", "2", "--hidden", "16", "--step", "eager", "--no-progress"]
    assert main([*train, "--epochs", "2", "--run-dir", str(tmp_path / "whole")]) == 0
    assert main([*train, "--epochs", "1", "--run-dir", str(tmp_path / "halves")]) == 0
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "halves"), "--epochs", "2", "--no-progress"]) == 0
    rows = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("whole", "halves")]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "step"}
    assert [strip(r) for r in rows[0]] == [strip(r) for r in rows[1]]
    (folder / "red" / "1.png").rename(folder / "red" / "one.png")  # same pixels, another name
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "halves"), "--epochs", "3"]) == 2
    assert "was trained on other data" in capsys.readouterr().err


# ------------------------------------------------------------------ found by a new user's trial


def test_a_third_split_beside_train_and_test_is_refused_not_ignored(tmp_path):
    from PIL import Image

    from pyro_vae.image_folder import read_image_folder

    for split in ("train", "test", "valid"):
        (tmp_path / split).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / split / "a.png")
    with pytest.raises(DataError, match=r"has train/ and test/ and also valid, which would be left out; move its images"):
        read_image_folder(tmp_path, progress=False)


def test_image_errors_name_the_real_cause_and_no_python_object(tmp_path):
    from PIL import Image

    from pyro_vae.image_folder import read_image_folder

    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey: not damaged
    with pytest.raises(DataError, match=r"deep.png: I;16 pixels are not 8-bit; convert the images to 8 bits") as e:
        read_image_folder(tmp_path, progress=False)
    assert "damaged" not in str(e.value)
    (tmp_path / "deep.png").write_text("not an image at all")
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path, progress=False)
    assert str(e.value) == f"{tmp_path / 'deep.png'}: not an image (no PNG or JPEG data in it); remove it from the folder"


def test_many_sizes_are_summarized_and_layout_is_refused_for_grey_arrays(tmp_path):
    from PIL import Image

    from pyro_vae.image_arrays import array_layout
    from pyro_vae.image_folder import read_image_folder

    for side in range(8, 14):
        Image.fromarray(np.zeros((side, side), np.uint8)).save(tmp_path / f"{side}.png")
    with pytest.raises(DataError, match=r"holds images of 6 sizes: .* and 3 more sizes; pass --image-size") as e:
        read_image_folder(tmp_path, progress=False)
    assert str(e.value).count("e.g.") == 3
    with pytest.raises(DataError, match=r"grey images \(N, H, W\): leave --layout out"):
        array_layout(np.zeros((2, 8, 8), np.uint8), "x.npy", "NCHW")
