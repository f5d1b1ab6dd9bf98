"""Issue 24, item 10: a VAE that has run under Pyro can be pickled, deep-copied and torch.saved;
the copy scores data as the original does and trains on its own."""

import copy
import io
import pickle

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_vae import VAE, make_elbo

from .conftest import binary_batch


def round_trip(how: str, vae: VAE) -> VAE:
    if how == "pickle":
        return pickle.loads(pickle.dumps(vae))
    if how == "deepcopy":
        return copy.deepcopy(vae)
    buffer = io.BytesIO()
    torch.save(vae, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
@pytest.mark.parametrize("guide", ["gaussian", "iaf"])
def test_a_vae_that_has_run_under_pyro_survives_a_round_trip(how, guide):
    vae, x = VAE(x_dim=6, z_dim=2, hidden=(5,), guide=guide, flow_steps=1), binary_batch(4, 6)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), make_elbo("trace"))
    svi.step(x)  # the parameter store now links every parameter (a weakref each)
    clone = round_trip(how, vae)
    assert type(clone) is VAE and clone.name == vae.name
    original, copied = vae.state_dict(), clone.state_dict()
    assert original.keys() == copied.keys() and all(torch.equal(original[k], copied[k]) for k in original)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(vae.parameters(), clone.parameters()))  # its own
    assert all(hasattr(p, "unconstrained") for p in vae.parameters())  # the original still trains under SVI
    svi.step(x)
    pyro.clear_param_store()  # the clone registers its own parameters and trains
    before = [p.detach().clone() for p in clone.parameters()]
    SVI(clone.model, clone.guide, pyro.optim.Adam({"lr": 0.01}), make_elbo("trace")).step(x)
    assert all(not torch.equal(b, p) for b, p in zip(before, clone.parameters()))
