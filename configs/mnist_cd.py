"""Consistency distillation of the default run (flow matching, configs/mnist.py): a student
that samples in 1 to 4 network calls.

    python main.py --config=configs/mnist.py --workdir=runs/mnist          # the teacher
    python main.py --config=configs/mnist_cd.py --workdir=runs/mnist_cd
    python main.py --mode=sample --config=configs/mnist_cd.py --workdir=runs/mnist_cd \\
        --config.sample.num_steps=2

`get_config(teacher_workdir)` names another teacher (default runs/mnist). The student is the
teacher's network and starts from its EMA weights. Each step, one Heun step of the teacher's
probability-flow ODE at the teacher's recipe guidance (1.5: the student learns the guided ODE
and samples without guidance, one call per step) gives the target point between adjacent
levels of 18 Karras levels on the flow's range. A step costs about 2.7 of the teacher's
(two guided teacher calls, the student's forward and backward, the target's forward), so 400
steps stay within the teacher's 1,200-step training time.
"""

import ml_collections

from ddpm.config import presets


def get_config(teacher_workdir: str | None = None) -> ml_collections.ConfigDict:
    config = presets.mnist()  # the teacher's data, network and process
    config.objective = "consistency"
    config.phema.track = ()  # the student keeps the ordinary EMA only
    c = config.consistency
    c.teacher_workdir = teacher_workdir or "runs/mnist"
    c.teacher_guidance = config.sample.guidance_scale
    c.num_levels = 18
    c.target_ema = 0.95

    t = config.training
    t.num_steps = 400
    t.learning_rate = 2e-4
    t.warmup_steps = 0
    t.lr_schedule = "constant"
    t.ema_decay = 0.99
    t.label_dropout = 0.0  # guidance is distilled in; the student needs no null label
    t.log_every = 50
    t.checkpoint_every = 100
    t.sample_every = 100
    config.sample.method = "consistency"
    config.sample.spacing = None
    config.sample.num_steps = 2
    config.sample.guidance_scale = 1.0
    config.eval.metrics = ("fd", "accuracy")
    config.eval.guidance_scales = (1.0,)
    return config
