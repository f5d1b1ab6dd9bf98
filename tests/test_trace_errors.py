"""Issue 24, item 11: a library error raised inside a Pyro trace reaches the user as the library's
one line; Pyro's table of site shapes, which it appends to any ValueError or RuntimeError raised
under ``poutine.trace``, stays on errors that are not the library's."""

import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive

from pyro_vae import VAE, ConfigError, DataError, log_marginal_likelihood, make_elbo


@pytest.fixture
def vae():
    return VAE(x_dim=4, z_dim=2, hidden=(3,))


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "Trace Shapes" not in text, text
    return text


def test_bad_data_in_an_elbo_is_the_likelihoods_one_line(vae):
    with pytest.raises(DataError) as error:
        make_elbo("trace").loss(vae.model, vae.guide, torch.full((3, 4), 0.5))
    assert one_line(error).startswith("the bernoulli likelihood needs binary data")


def test_an_empty_batch_in_log_marginal_likelihood_is_one_line(vae):
    with pytest.raises(DataError) as error:
        log_marginal_likelihood(vae.model, vae.guide, torch.zeros(0, 4), num_samples=3)
    assert one_line(error) == "x is an empty batch; pass at least one datapoint"


def test_a_bad_size_under_nested_traces_is_one_line(vae):
    with pytest.raises(ConfigError) as error:
        make_elbo("iwae", 2).loss(vae.model, vae.guide, torch.zeros(3, 4), subsample_size=0)
    assert one_line(error) == "subsample_size must be an integer from 1 to 3, got 0"
    with pytest.raises(ConfigError) as error:
        Predictive(vae.model, num_samples=2)(batch_size=0)
    assert one_line(error) == "batch_size must be an integer >= 1, got 0"


def test_errors_that_are_not_the_librarys_keep_pyros_table():
    def model():
        raise ValueError("a user's own error")

    with pytest.raises(ValueError, match="a user's own error\n\\s*Trace Shapes:"):
        poutine.trace(model).get_trace()
