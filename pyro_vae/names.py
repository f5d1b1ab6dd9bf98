"""The names the library and the command line accept, in one module that imports nothing heavy,
so that ``pyro-vae --help`` answers without loading torch."""

from .errors import ConfigError, DataError
from .options import choices, data_kind

# data set -> its torchvision class; folder and array are the user's own files (--data-dir names them)
IDX_DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}  # read as IDX files
DATASETS = {**IDX_DATASETS, "cifar10": "CIFAR10", "svhn": "SVHN", "folder": None, "array": None}
LAYOUTS = ("NCHW", "NHWC")  # how a 4-D array of images is ordered: channels first or last
DEFAULT_TEST_FRACTION = 0.1  # of a folder or array without a test split of its own, held out at random
LIKELIHOODS = choices("likelihood")  # the library's own; pyro_vae.options holds them, and any registered later
# setting -> (the field that chooses, the one choice that reads the setting)
DATA_OPTIONS = {"image_size": ("dataset", "folder"), "layout": ("dataset", "array")}
ESTIMATORS = ("trace", "meanfield", "iwae", "renyi")
TRAIN_ESTIMATORS = ("trace", "meanfield", "iwae")  # renyi tempers its weights under minibatch scaling: compare only
ARCHITECTURES = ("mlp", "conv")
ACTIVATIONS = ("softplus", "relu", "tanh", "elu")
BINARIZATIONS = ("none", "threshold", "static", "dynamic", "dequantize")  # pixel preparations
BACKENDS = ("auto", "nccl", "gloo")
STEP_MODES = ("traced", "inductor", "eager")  # how a training step runs: pyro_vae.step
DEFAULT_STEP = "traced"  # the same draws and numbers as eager, without Pyro's per-step Python work
SAVED_MODELS = ("best", "last")  # a run's best epoch by validation ELBO (best.pt), or its last (checkpoint.pt)
DEFAULT_TIMEOUT_S = 600.0  # how long a rank of a distributed run waits for the others


def check_binarization_name(binarization: str) -> None:
    """:class:`~pyro_vae.errors.ConfigError` unless ``binarization`` is one of :data:`BINARIZATIONS`."""
    if binarization not in BINARIZATIONS:
        raise ConfigError(f"unknown binarization {binarization!r}; valid: {', '.join(BINARIZATIONS)}")


def default_binarization(likelihood: str) -> str:
    """How pixels are prepared for ``likelihood`` unless asked otherwise: dynamic binarization for
    binary data, the pixels as they are (k / 255) otherwise."""
    return "dynamic" if data_kind(likelihood) == "binary" else "none"


def check_binarization(likelihood: str, binarization: str) -> None:
    """:class:`DataError` if pixels prepared with ``binarization`` cannot lie in ``likelihood``'s support."""
    check_binarization_name(binarization)
    kind = data_kind(likelihood)
    if kind == "binary" and binarization in ("none", "dequantize"):
        raise DataError(
            f"the {likelihood} likelihood needs pixels in {{0, 1}} but binarization {binarization!r} keeps them "
            "continuous in [0, 1]; use --binarize dynamic, static or threshold, or the "
            "continuous_bernoulli, normal or a discretized likelihood"
        )
    if kind == "8bit" and binarization != "none":
        what = (
            "dequantize is for density likelihoods"
            if binarization == "dequantize"
            else "binarized pixels are not 8-bit images; the bernoulli likelihood models them"
        )
        raise DataError(f"the {likelihood} likelihood scores the 8-bit levels themselves; use --binarize none ({what})")


def dataset_name(name: str) -> str:
    """The canonical name of a supported dataset (``fashion-mnist`` and ``Fashion_MNIST`` are
    ``fashion_mnist``); :class:`~pyro_vae.errors.DataError` listing the valid names otherwise."""
    canonical = str(name).strip().lower().replace("-", "_")
    if canonical not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} (fashion-mnist is accepted too; folder "
            "and array read your own images from --data-dir)"
        )
    return canonical
