"""The names the library and the command line accept, in one module that imports nothing heavy,
so that ``pyro-vae --help`` answers without loading torch. """

from .errors import ConfigError, DataError

DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}  # -> torchvision class
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "normal", "discretized_logistic", "discretized_normal", "discretized_logistic_mixture")
NORMAL_SCALES = ("shared", "pixel", "decoder")  # or a positive float: a fixed scale
MAX_MIXTURE_COMPONENTS = 100  # logistics per pixel; PixelCNN++ uses 10, more is a typo rather than a model
LIKELIHOOD_OPTIONS = {"normal_scale": "normal", "mixture_components": "discretized_logistic_mixture"}  # setting -> the one likelihood that reads it
PRIORS = ("standard", "vamp")  # p(z): N(0, I), or the VampPrior (pyro_vae.priors)
GUIDES = ("gaussian", "iaf")  # q(z|x): a diagonal Gaussian, or one followed by an inverse autoregressive flow
DEFAULT_PSEUDO_INPUTS, DEFAULT_FLOW_STEPS = 500, 2
# setting -> (the field that chooses, the one choice that reads the setting)
LATENT_OPTIONS = {"pseudo_inputs": ("prior", "vamp"), "flow_steps": ("guide", "iaf")}
ESTIMATORS = ("trace", "meanfield", "iwae", "renyi")
ARCHITECTURES = ("mlp", "conv")
ACTIVATIONS = ("softplus", "relu", "tanh", "elu")
BINARIZATIONS = ("none", "threshold", "static", "dynamic", "dequantize")  # pixel preparations
BACKENDS = ("auto", "nccl", "gloo")
STEP_MODES = ("traced", "inductor", "eager")  # how a training step runs: pyro_vae.compiled
DEFAULT_TIMEOUT_S = 600.0  # how long a rank of a distributed run waits for the others


def check_binarization_name(binarization: str) -> None:
    """:class:`~pyro_vae.errors.ConfigError` unless ``binarization`` is one of :data:`BINARIZATIONS`."""
    if binarization not in BINARIZATIONS:
        raise ConfigError(f"unknown binarization {binarization!r}; valid: {', '.join(BINARIZATIONS)}")


def dataset_name(name: str) -> str:
    """The canonical name of a supported dataset (``fashion-mnist`` and ``Fashion_MNIST`` are
    ``fashion_mnist``); :class:`~pyro_vae.errors.DataError` listing the valid names otherwise."""
    canonical = str(name).strip().lower().replace("-", "_")
    if canonical not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} (fashion-mnist is accepted too)")
    return canonical
