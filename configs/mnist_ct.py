"""Consistency training (no teacher; improved CT, Song & Dhariwal 2023) of the default run's
network and flow process, tuned from the default run's weights (ECT's start, Geng et al.
2024): a student that samples in 1 to 4 network calls.

    python main.py --config=configs/mnist.py --workdir=runs/mnist          # the start
    python main.py --config=configs/mnist_ct.py --workdir=runs/mnist_ct
    python main.py --mode=sample --config=configs/mnist_ct.py --workdir=runs/mnist_ct \\
        --config.sample.num_steps=2

`get_config(init_workdir)` names another start (default runs/mnist; None trains from
scratch, which needs far more steps). Each step pairs adjacent levels of improved CT's
curriculum (10 levels doubling to 80 over the run), drawn by its lognormal weights, noises one
image with the same noise at both, and pulls the student's output at the higher level toward
its own output, without gradient, at the lower (target_ema 0), by the pseudo-Huber distance
weighted 1 / (s_n+1 - s_n). A step costs about 1.5 of the default run's (the student's
forward and backward, a second forward), so 800 steps stay within its 1,200-step training.
"""

import ml_collections

from ddpm.config import presets


def get_config(init_workdir: str | None = "runs/mnist") -> ml_collections.ConfigDict:
    config = presets.mnist()  # the default run's data, network and process
    config.objective = "consistency"
    config.phema.track = ()
    c = config.consistency
    c.init_workdir = init_workdir
    c.curriculum = "ict"
    c.start_levels, c.end_levels = 10, 80
    c.level_sampling = "lognormal"
    c.distance = "pseudo_huber"
    c.weighting = "inverse_gap"
    c.target_ema = 0.0

    t = config.training
    t.num_steps = 800
    t.learning_rate = 2e-4
    t.warmup_steps = 0
    t.lr_schedule = "constant"
    t.ema_decay = 0.99
    t.log_every = 50
    t.checkpoint_every = 100
    t.sample_every = 200
    config.sample.method = "consistency"
    config.sample.spacing = None
    config.sample.num_steps = 2
    config.eval.metrics = ("fd", "accuracy")
    config.eval.guidance_scales = (config.sample.guidance_scale,)
    return config
