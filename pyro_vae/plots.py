"""PNG figures of a VAE training run: ELBO curves, image grids, reconstructions, latent space, and
:func:`draw_run_figures`, the set a training run redraws every epoch.

Images are grey, ``(N, H, W)``, ``(N, 1, H, W)`` or flat ``(N, H*W)`` of a square, or RGB, ``(N, 3, H, W)``;
flat images of any other shape are read with ``image_shape=(C, H, W)``. Every function takes plain
tensors, arrays or lists, writes one PNG atomically (creating parent
directories; a symlink at the target is replaced, not followed) and returns its path. Grids are
tiled by torchvision's ``make_grid``. Figures are built as ``matplotlib.figure.Figure``
objects rendered by Agg, never through pyplot, so no global figure state is touched and
the functions are safe in scripts, servers and threads without a display.
"""

from math import isqrt
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .checkpoint import replace_atomically
from .errors import ConfigError, DataError
from .runtime import seeded

_DPI = 100
_PAD = 2  # pixels between tiles of an image grid
_PAD_VALUE = 0.5  # grey separators, visible against both black and white backgrounds
_INCHES_PER_TILE = 0.8


def _numpy(x):
    """A tensor, array or nested list as a numpy array (floats as float64)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        return x.numpy()
    return np.asarray(x)


def _save(fig, path):
    """Write ``fig`` as a PNG at ``path`` atomically, release it, return the path."""
    path = Path(path)
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight"))
    finally:
        fig.clear()
    return path


def _as_images(images, what="images", image_shape=None):
    """(N, H*W), (N, 1, H, W) or (N, H, W) pixel values as a float (N, H, W) array, (N, 3, H, W) as
    (N, H, W, 3), clamped to [0, 1]; flat images (N, C*H*W) as ``image_shape`` (C, H, W) says."""
    arr = _numpy(images).astype(np.float64)
    if image_shape is not None and arr.ndim == 2:
        if arr.shape[1] != np.prod(image_shape):
            raise DataError(f"{what} of shape {tuple(arr.shape)} are not flat images of shape {tuple(image_shape)}")
        arr = arr.reshape(arr.shape[0], *image_shape)
    if arr.ndim == 4 and arr.shape[1] in (1, 3):
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)
    elif arr.ndim == 4:
        raise DataError(f"{what} of shape {tuple(arr.shape)}: images need 1 (grey) or 3 (RGB) channels")
    elif arr.ndim == 2:
        side = isqrt(arr.shape[1])
        if side * side != arr.shape[1]:
            raise DataError(
                f"{what} of shape {tuple(arr.shape)}: flat images need a square number of pixels "
                "(784 for 28x28); pass (N, H, W) or (N, 1, H, W) for other sizes"
            )
        arr = arr.reshape(arr.shape[0], side, side)
    if arr.ndim not in (3, 4) or arr.shape[0] == 0 or 0 in arr.shape[1:]:
        raise DataError(
            f"{what} of shape {tuple(arr.shape)}: expected a non-empty batch of grey images shaped (N, 784), "
            "(N, 1, 28, 28) or (N, 28, 28), or of RGB images (N, 3, H, W)"
        )
    if not np.isfinite(arr).all():
        raise DataError(f"{what} contain NaN or infinite pixel values; check the model's outputs")
    return np.clip(arr, 0.0, 1.0)


def _tile(images, ncol, pad=_PAD):
    """One image of (N, H, W) grey or (N, H, W, 3) RGB images laid out row by row, ``ncol`` per row,
    ``pad`` pixels apart (torchvision's ``make_grid``, without its outer border): (H', W') or (H', W', 3)."""
    from .runtime import load_torchvision

    colour = images.ndim == 4
    tensor = torch.from_numpy(images)
    tensor = tensor.permute(0, 3, 1, 2) if colour else tensor.unsqueeze(1)
    grid = load_torchvision().utils.make_grid(tensor, nrow=ncol, padding=pad, pad_value=_PAD_VALUE)
    grid = grid.permute(1, 2, 0).numpy() if colour else grid[0].numpy()
    return grid[pad : grid.shape[0] - pad, pad : grid.shape[1] - pad] if pad else grid


def _show(ax, grid):
    """``grid`` on ``ax``: grey levels in [0, 1] as such, or RGB."""
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if grid.ndim == 2 else {}
    ax.imshow(grid, interpolation="nearest", **grey)


def _grid_figure(grid, ncol, title=None):
    """A figure showing a tiled grey or RGB ``grid``, ``ncol`` images wide, without ticks."""
    width = max(2.0, ncol * _INCHES_PER_TILE)
    fig = Figure(figsize=(width, width * grid.shape[0] / grid.shape[1]), layout="constrained")
    ax = fig.add_subplot()
    _show(ax, grid)
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title)
    return fig


def plot_elbo_curves(metrics, path):
    """Train, validation and test ELBO (nats per image) against epoch, the best validation epoch marked.

    ``metrics`` is a list of per-epoch dicts with "epoch", "train_elbo" and optionally
    "val_elbo" and "test_elbo"; epochs where one is missing or None are left out of its curve.
    """
    if len(metrics) == 0:
        raise DataError("no metrics to plot: pass at least one epoch's dict")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("train_elbo", "train"), ("val_elbo", "validation"), ("test_elbo", "test")):
        points = [(m["epoch"], float(m[key])) for m in metrics if m.get(key) is not None]
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
        if key == "val_elbo" and points:
            best = max(points, key=lambda point: point[1])
            ax.axvline(best[0], color="grey", linestyle=":", label=f"best validation: epoch {best[0]}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per image)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_image_grid(images, path, nrow=None, title=None, image_shape=None):
    """A grid of grey or RGB images with ``nrow`` images per row (as torchvision's ``make_grid``).

    By default the grid is square-ish: ceil(sqrt(N)) images per row. Pixel values are
    clamped to [0, 1]. ``image_shape``: the (C, H, W) of flat images.
    """
    images = _as_images(images, image_shape=image_shape)
    n = len(images)
    ncol = isqrt(n - 1) + 1 if nrow is None else int(nrow)
    if ncol < 1:
        raise ConfigError(f"nrow={nrow}: the number of images per row must be at least 1")
    ncol = min(ncol, n)
    fig = _grid_figure(_tile(images, ncol), ncol, title)
    return _save(fig, path)


def plot_reconstructions(originals, reconstructions, path, ncol=8, image_shape=None):
    """Originals and their reconstructions in pairs of rows, ``ncol`` images wide.

    Each row of originals is followed by the row of their reconstructions, so 16 images
    make four rows: originals 0-7, reconstructions 0-7, originals 8-15, reconstructions 8-15.
    ``image_shape``: the (C, H, W) of flat images.
    """
    originals = _as_images(originals, "originals", image_shape)
    reconstructions = _as_images(reconstructions, "reconstructions", image_shape)
    if originals.shape != reconstructions.shape:
        raise DataError(
            f"{len(originals)} originals of size {originals.shape[1:]} but {len(reconstructions)} "
            f"reconstructions of size {reconstructions.shape[1:]}: pass one reconstruction per original"
        )
    if ncol < 1:
        raise ConfigError(f"ncol={ncol}: the number of images per row must be at least 1")
    n, shape = len(originals), originals.shape[1:]  # (h, w) or (h, w, 3)
    ncol = min(ncol, n)
    pairs = -(-n // ncol)
    blank = np.full((pairs * ncol - n, *shape), _PAD_VALUE)
    rows = np.stack(
        [np.concatenate([originals, blank]), np.concatenate([reconstructions, blank])]
    )  # (2, pairs * ncol, *shape)
    interleaved = np.swapaxes(rows.reshape(2, pairs, ncol, *shape), 0, 1).reshape(-1, *shape)
    fig = _grid_figure(_tile(interleaved, ncol), ncol, "test images (top) and reconstructions (bottom)")
    return _save(fig, path)


def plot_latent_manifold(decode, path, n=20, z_range=None, image_shape=None):
    """The decoded manifold of a 2-D latent space (Kingma & Welling 2013, Fig. 4).

    ``decode`` maps a (n*n, 2) float tensor of latent points (on the CPU) to (n*n, H*W)
    pixel means in [0, 1] (or (n*n, C*H*W) read as ``image_shape``, or images (n*n, C, H, W)).
    Each axis takes ``n`` values: the standard-normal quantiles of probabilities evenly spaced
    from 0.05 to 0.95, or ``torch.linspace(*z_range, n)`` when ``z_range=(low, high)`` is given.
    z1 runs left to right and z2 bottom to top.
    """
    if n < 2:
        raise ConfigError(f"n={n}: the manifold needs at least 2 points per latent axis")
    if z_range is None:
        values = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    else:
        low, high = (float(v) for v in z_range)
        if not low < high:
            raise ConfigError(f"z_range={z_range}: expected (low, high) with low < high")
        values = torch.linspace(low, high, n)
    # Tile i (row-major, rows from the top) shows z1 = values[column], z2 = values[n - 1 - row].
    z2, z1 = torch.meshgrid(values.flip(0), values, indexing="ij")
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)
    with torch.no_grad():
        decoded = decode(z)
    images = _as_images(decoded, "decoded images", image_shape)
    if len(images) != n * n:
        raise DataError(f"decode returned {len(images)} images for {n * n} latent points")
    h, w = images.shape[1:3]
    fig = Figure(figsize=(8, 8), layout="constrained")
    ax = fig.add_subplot()
    _show(ax, _tile(images, n, pad=0))
    ticks = np.unique(np.linspace(0, n - 1, min(n, 5)).round().astype(int))
    labels = [f"{values[k].item():.2f}" for k in ticks]
    ax.set_xticks((ticks + 0.5) * w - 0.5, labels)
    ax.set_yticks((n - 1 - ticks + 0.5) * h - 0.5, labels)
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    ax.set_title("decoded latent manifold")
    return _save(fig, path)


def plot_latent_scatter(z, labels, path, class_names=None):
    """Scatter of 2-D latent means coloured by integer class label (tab10, cycling past 10 classes).

    ``class_names[k]`` names label ``k`` in the legend; labels are shown as numbers otherwise.
    """
    z = _numpy(z).astype(np.float64)
    labels = _numpy(labels)
    if z.ndim != 2 or z.shape[1] != 2 or len(z) == 0:
        raise DataError(f"z of shape {tuple(z.shape)}: expected non-empty (N, 2) latent means")
    if labels.shape != (len(z),):
        raise DataError(f"labels of shape {tuple(labels.shape)}: expected one label per point, ({len(z)},)")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise DataError("labels must be integer class indices")
        labels = labels.astype(np.int64)
    classes = np.unique(labels)
    if classes[0] < 0:
        raise DataError(f"label {classes[0]}: class labels must be non-negative")
    if class_names is not None and classes[-1] >= len(class_names):
        raise DataError(f"label {classes[-1]} has no name among the {len(class_names)} class_names")
    cmap = colormaps["tab10"]
    fig = Figure(figsize=(7.5, 6), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(z[:, 0], z[:, 1], c=cmap(labels % cmap.N), s=4, alpha=0.6, linewidths=0)
    handles = [
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            color=cmap(k % cmap.N),
            label=str(k) if class_names is None else class_names[k],
        )
        for k in classes
    ]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xlabel("$z_1$ (posterior mean)")
    ax.set_ylabel("$z_2$ (posterior mean)")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


@torch.no_grad()
def draw_run_figures(vae, test_batches, metrics, folder, class_names, seed: int) -> None:
    """A run's figures in ``folder`` (a :class:`~pyro_vae.run.RunFolder` or path): ELBO curves,
    test reconstructions, prior samples drawn from ``seed`` and, for ``z_dim == 2``, the latent
    manifold and the test encodings coloured by label (named by ``class_names``, if not None),
    all images in the test split's shape, grey or RGB."""
    folder = Path(getattr(folder, "path", folder))
    shape = test_batches.image_shape
    vae.eval()
    plot_elbo_curves(metrics, folder / "elbo.png")
    x, _ = next(test_batches.eval_batches())
    reconstructions = vae.reconstruct(x[:32]).cpu()
    plot_reconstructions(x[:32].cpu(), reconstructions, folder / "reconstructions.png", image_shape=shape)
    with seeded(vae.prior_loc.device, seed):
        plot_image_grid(
            vae.generate(64).cpu(),
            folder / "samples.png",
            title="samples from the prior: mean of p(x|z), z ~ p(z)",
            image_shape=shape,
        )
    if vae.z_dim == 2:
        decode = lambda z: vae.likelihood(vae.decoder(z.to(vae.prior_loc))).mean.reshape(z.shape[0], -1).cpu()
        plot_latent_manifold(decode, folder / "manifold.png", image_shape=shape)
        codes = torch.cat([vae.encoder(xb)[0].cpu() for xb, _ in test_batches.eval_batches()])
        labels = test_batches.labels.cpu()
        names = class_names if class_names is not None and len(class_names) > labels.max() else None
        plot_latent_scatter(codes, labels, folder / "latent_scatter.png", class_names=names)
