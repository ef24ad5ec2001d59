"""Progressive distillation of the default run (flow matching, configs/mnist.py): guided, then
progressive rounds, a student that samples in 1 to 8 DDIM steps of one network call.

    python main.py --config=configs/mnist.py --workdir=runs/mnist          # the teacher
    python main.py --config=configs/mnist_pd.py --workdir=runs/mnist_pd
    python main.py --mode=sample --config=configs/mnist_pd.py --workdir=runs/mnist_pd

On a flow a DDIM step is the Euler step. `configs/mnist_pd.py:TEACHER_WORKDIR` names another
teacher (default runs/mnist). Stage 1 teaches the student the teacher's guided prediction for
scales in [1, 2] (around the teacher's 1.5); then each round halves the DDIM steps, 16 -> 8
-> 4 -> 2 -> 1 (`presets.mnist_progressive_distillation`, as configs/mnist_distill.py for the
DDPM run). A run stopped at the end of a round (--config.training.num_steps=420: the 4-step
student) samples with that round's step count (--config.sample.num_steps=4).
"""

import ml_collections

from ddpm.config import presets


def get_config(teacher_workdir: str | None = None) -> ml_collections.ConfigDict:
    return presets.mnist_progressive_distillation(
        presets.mnist(), teacher_workdir or "runs/mnist", guidance=(1.0, 2.0)
    )
