"""pyro-vae: variational autoencoders as real Pyro programs."""
