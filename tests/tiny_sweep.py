"""A sweep file for test_sweep: two 4-step trials of the tiny config, one per learning rate."""

import ml_collections

from tests.tiny import tiny_config


def get_config() -> ml_collections.ConfigDict:
    return tiny_config(num_steps=4, checkpoint_every=2, log_every=2)


def get_sweep() -> dict:
    return {"grid": {"training.learning_rate": [1e-3, 3e-3]}}
