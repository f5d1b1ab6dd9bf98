"""Figures are real PNG files whose pixels reflect the data they were given."""

import threading

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from pyro_vae.data import FASHION_MNIST_CLASSES
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.plots import (
    plot_elbo_curves,
    plot_image_grid,
    plot_latent_manifold,
    plot_latent_scatter,
    plot_reconstructions,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path, min_side=50):
    """The RGBA pixels of a PNG file, after checking it is one of a sensible size."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert min(pixels.shape[:2]) >= min_side and max(pixels.shape[:2]) <= 4000
    return pixels


def gray(pixels):
    return pixels[..., :3].mean(axis=2)


def grid_region(pixels):
    """The image-grid part of a figure: rows and columns mostly not the white background."""
    mask = gray(pixels) < 0.97
    rows = np.flatnonzero(mask.mean(axis=1) > 0.5)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.5)
    return gray(pixels)[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def bands(region, n, axis):
    """Mean brightness of ``n`` equal bands of ``region`` along ``axis`` (0: top to bottom)."""
    return np.array([band.mean() for band in np.array_split(region, n, axis=axis)])


# ---------------------------------------------------------------- ELBO curves


def test_elbo_curves_writes_png_into_new_directory(tmp_path):
    metrics = [{"epoch": e, "train_elbo": -200.0 + 10 * e, "test_elbo": -205.0 + 10 * e} for e in range(1, 11)]
    path = tmp_path / "figures" / "nested" / "elbo.png"
    assert plot_elbo_curves(metrics, path) == path
    read_png(path)


def test_elbo_curves_single_epoch(tmp_path):
    path = plot_elbo_curves([{"epoch": 1, "train_elbo": -180.5, "test_elbo": -182.0}], tmp_path / "one.png")
    read_png(path)


def test_elbo_curves_missing_test_values(tmp_path):
    metrics = [
        {"epoch": 1, "train_elbo": -190.0, "test_elbo": None},
        {"epoch": 2, "train_elbo": -170.0},
        {"epoch": 3, "train_elbo": torch.tensor(-160.0), "test_elbo": torch.tensor(-162.0)},
    ]
    read_png(plot_elbo_curves(metrics, tmp_path / "gaps.png"))
    read_png(plot_elbo_curves(metrics[:2], tmp_path / "no_test.png"))


def test_elbo_curves_rejects_empty_metrics(tmp_path):
    with pytest.raises(DataError):
        plot_elbo_curves([], tmp_path / "empty.png")


# ---------------------------------------------------------------- image grids


def test_image_grid_brightness_follows_pixels(tmp_path):
    black = read_png(plot_image_grid(torch.zeros(16, 784), tmp_path / "black.png"))
    white = read_png(plot_image_grid(torch.full((16, 784), 0.9), tmp_path / "white.png"))
    assert grid_region(black).mean() < 0.2
    assert grid_region(white).mean() > 0.8


def test_image_grid_puts_each_image_in_its_cell(tmp_path):
    images = torch.zeros(4, 28, 28)
    images[1] = 0.9  # row 0, column 1 of a 2 x 2 grid
    region = grid_region(read_png(plot_image_grid(images, tmp_path / "grid.png", nrow=2)))
    top, bottom = np.array_split(region, 2, axis=0)
    quadrants = [half.mean() for row in (top, bottom) for half in np.array_split(row, 2, axis=1)]
    assert quadrants[1] > 0.75
    assert max(quadrants[0], quadrants[2], quadrants[3]) < 0.2


def test_image_grid_layout_square_by_default_nrow_images_per_row(tmp_path):
    square = grid_region(read_png(plot_image_grid(torch.zeros(16, 784), tmp_path / "square.png")))
    assert 0.9 < square.shape[1] / square.shape[0] < 1.1
    wide = grid_region(read_png(plot_image_grid(torch.zeros(8, 784), tmp_path / "wide.png", nrow=8)))
    assert 7 < wide.shape[1] / wide.shape[0] < 9


def test_image_grid_accepts_flat_channel_and_plain_shapes(tmp_path):
    images = torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(0))
    plain = read_png(plot_image_grid(images, tmp_path / "plain.png"))
    flat = read_png(plot_image_grid(images.reshape(6, 784), tmp_path / "flat.png"))
    channel = read_png(plot_image_grid(images.unsqueeze(1).numpy(), tmp_path / "channel.png"))
    np.testing.assert_array_equal(plain, flat)
    np.testing.assert_array_equal(plain, channel)


def test_image_grid_clamps_to_unit_interval(tmp_path):
    images = torch.zeros(4, 784)
    images[:2] = 5.0
    images[2:] = -3.0
    clamped = read_png(plot_image_grid(images.clamp(0, 1), tmp_path / "clamped.png", title="t"))
    raw = read_png(plot_image_grid(images, tmp_path / "raw.png", title="t"))
    np.testing.assert_array_equal(raw, clamped)


@pytest.mark.parametrize("shape", [(4, 783), (4, 2, 28, 28), (0, 784), (784,)])
def test_image_grid_rejects_bad_shapes(tmp_path, shape):
    with pytest.raises(DataError):
        plot_image_grid(torch.zeros(shape), tmp_path / "bad.png")


def test_image_grid_rejects_nan(tmp_path):
    with pytest.raises(DataError, match="NaN"):
        plot_image_grid(torch.full((4, 784), float("nan")), tmp_path / "nan.png")


def test_figures_from_several_threads(tmp_path):
    errors = []

    def draw(k):
        try:
            read_png(plot_image_grid(torch.full((9, 784), k / 8), tmp_path / f"t{k}.png"))
        except Exception as e:  # re-raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---------------------------------------------------------------- reconstructions


def test_reconstructions_alternate_original_and_reconstruction_rows(tmp_path):
    originals = torch.zeros(16, 784)
    reconstructions = torch.full((16, 1, 28, 28), 0.8)
    path = plot_reconstructions(originals, reconstructions, tmp_path / "recon.png")
    region = grid_region(read_png(path))
    assert 1.8 < region.shape[1] / region.shape[0] < 2.2  # 8 columns, 4 rows
    top_to_bottom = bands(region, 4, axis=0)
    assert top_to_bottom[0] < 0.2 and top_to_bottom[2] < 0.2
    assert top_to_bottom[1] > 0.7 and top_to_bottom[3] > 0.7


def test_reconstructions_of_a_partial_row(tmp_path):
    read_png(plot_reconstructions(torch.rand(5, 784), torch.rand(5, 784), tmp_path / "five.png"))
    read_png(plot_reconstructions(torch.rand(11, 784), torch.rand(11, 784), tmp_path / "eleven.png"))


def test_reconstructions_reject_mismatched_counts(tmp_path):
    with pytest.raises(DataError):
        plot_reconstructions(torch.rand(8, 784), torch.rand(7, 784), tmp_path / "bad.png")


# ---------------------------------------------------------------- latent manifold


def brightness_from(axis, calls):
    """A decoder whose images are uniformly as bright as the normal CDF of z[:, axis]."""

    def decode(z):
        calls.append(z.clone())
        return (0.9 * torch.distributions.Normal(0.0, 1.0).cdf(z[:, axis : axis + 1])).expand(-1, 784)

    return decode


def test_manifold_z1_runs_left_to_right(tmp_path):
    calls = []
    path = plot_latent_manifold(brightness_from(0, calls), tmp_path / "manifold.png", n=10)
    assert len(calls) == 1
    assert calls[0].shape == (100, 2) and calls[0].dtype.is_floating_point
    left_to_right = bands(grid_region(read_png(path)), 10, axis=1)
    assert np.all(np.diff(left_to_right) > 0)
    assert left_to_right[0] < 0.1 and left_to_right[-1] > 0.8


def test_manifold_z2_increases_upwards(tmp_path):
    path = plot_latent_manifold(brightness_from(1, []), tmp_path / "manifold.png", n=10)
    top_to_bottom = bands(grid_region(read_png(path)), 10, axis=0)
    assert np.all(np.diff(top_to_bottom) < 0)


def test_manifold_grid_is_normal_quantiles_or_z_range(tmp_path):
    calls = []
    plot_latent_manifold(brightness_from(0, calls), tmp_path / "default.png", n=7)
    plot_latent_manifold(brightness_from(0, calls), tmp_path / "range.png", n=7, z_range=(-3, 3))
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 7))
    for z, expected in zip(calls, (quantiles, torch.linspace(-3, 3, 7))):
        for axis in (0, 1):
            torch.testing.assert_close(torch.unique(z[:, axis]), expected)


def test_manifold_rejects_wrong_number_of_images(tmp_path):
    with pytest.raises(DataError):
        plot_latent_manifold(lambda z: torch.zeros(3, 784), tmp_path / "bad.png", n=4)


def test_manifold_rejects_bad_configuration(tmp_path):
    with pytest.raises(ConfigError):
        plot_latent_manifold(brightness_from(0, []), tmp_path / "bad.png", n=1)
    with pytest.raises(ConfigError):
        plot_latent_manifold(brightness_from(0, []), tmp_path / "bad.png", n=4, z_range=(2, -2))


# ---------------------------------------------------------------- latent scatter


def test_class_name_constants():
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top"


def has_colour(pixels, hex_colour):
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(pixels[..., :3] - rgb).max(axis=2) < 0.02).any())


def test_latent_scatter_colours_by_label(tmp_path):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(500, 2, generator=generator)
    labels = torch.randint(0, 10, (500,), generator=generator)
    read_png(plot_latent_scatter(z, labels, tmp_path / "all.png", class_names=FASHION_MNIST_CLASSES))

    two_classes = read_png(plot_latent_scatter(z, labels % 2, tmp_path / "two.png"))
    assert has_colour(two_classes, "#1f77b4")  # tab10 colour of label 0
    assert has_colour(two_classes, "#ff7f0e")  # tab10 colour of label 1
    assert not has_colour(two_classes, "#2ca02c")  # tab10 colour of label 2, absent


@pytest.mark.parametrize(
    "z, labels, names",
    [
        (torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), None),
        (torch.zeros(5, 2), torch.zeros(4, dtype=torch.long), None),
        (torch.zeros(5, 2), torch.full((5,), 0.5), None),
        (torch.zeros(5, 2), torch.tensor([0, 1, 2, 3, 4]), ("a", "b")),
        (torch.zeros(2, 2), torch.tensor([-1, 0]), None),
    ],
)
def test_latent_scatter_rejects_bad_input(tmp_path, z, labels, names):
    with pytest.raises(DataError):
        plot_latent_scatter(z, labels, tmp_path / "bad.png", class_names=names)
