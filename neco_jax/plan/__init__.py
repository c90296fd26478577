"""Deviceless planning: the trainer's step compiled for GPUs and TPUs this machine lacks (`python -m neco_jax.plan`).

The package import stays light (no JAX): `__main__` sets the environment JAX needs before loading it.
"""
