"""A post-hoc sweep file for test_phema: the tiny config tracking two power EMAs, trained once,
then evaluated (FD of 20 samples) at a tracked and an untracked post-hoc width. Checkpoints
at steps 2, 4 and 6 serve as autoguidance models too."""

import ml_collections

from tests.tiny import tiny_config

TRACK = (0.05, 0.10)


def get_config() -> ml_collections.ConfigDict:
    config = tiny_config(num_steps=6, checkpoint_every=2)
    config.phema.track, config.phema.snapshot_every = TRACK, 2
    e = config.eval
    e.metrics, e.num_samples, e.batch_size, e.classifier_steps = ("fd",), 20, 20, 20
    return config


def get_sweep() -> dict:
    return {"grid": {"phema.sigma_rel": [0.05, 0.2]}}
