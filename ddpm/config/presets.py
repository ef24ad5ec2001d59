"""Named networks and the MNIST base recipe, for recipes to build on.

A model preset returns a complete `config.model` (its family's defaults with the preset's
values): `config.model = presets.ddpm_cifar10()`. `mnist()` is the default run's whole
config; configs/mnist.py returns it and the MNIST variants (DiT, text, latent) start from it,
so a recipe copied out of configs/ still works: recipes import only from the package.
"""

import ml_collections

from ddpm.config import schema


def _preset(family: str, **values) -> ml_collections.ConfigDict:
    model = schema.model_section(family)
    model.update(values)
    return model


def ddpm_cifar10() -> ml_collections.ConfigDict:
    """The DDPM paper's CIFAR-10 U-Net (35.7M parameters at 32x32x3, unconditional)."""
    return _preset(
        "unet",
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,
        dropout=0.1,
        num_groups=32,
    )


def ddpmpp_cifar10() -> ml_collections.ConfigDict:
    """DDPM++ at EDM's CIFAR-10 size (Karras et al., 2022; Song et al., 2021): 128 channels at
    multipliers 2/2/2, 4 ResBlocks per level, attention at 16x16, ResBlock resampling,
    additive time conditioning (EDM's adaptive_scale=False), dropout 0.13, class-conditional:
    56.5M parameters here (the paper's 55.7M; its DDPM++ also differs in the resampling
    filter and skip scaling)."""
    return _preset(
        "unet",
        ch=128,
        ch_mult=(2, 2, 2),
        num_res_blocks=4,
        attention_resolutions=(16,),
        num_heads=1,
        dropout=0.13,
        num_groups=32,
        resblock_updown=True,
        num_classes=10,
    )


def mnist_small() -> ml_collections.ConfigDict:
    """Class-conditional MNIST at 28x28x1 on a 2-core CPU: 16/32/64 channels (28 -> 14 -> 7),
    one ResBlock per level, attention only in the 7x7 middle block; 0.64M parameters."""
    return _preset(
        "unet",
        ch=16,
        ch_mult=(1, 2, 4),
        num_res_blocks=1,
        attention_resolutions=(),
        num_heads=4,
        dropout=0.0,
        num_classes=10,
        num_groups=8,
    )


# DiT (Peebles & Xie 2023, table 1): size -> (hidden_size, depth, num_heads).
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DIT_PATCHES = (2, 4, 8)


def dit(size: str = "XL", patch: int = 2, **overrides) -> ml_collections.ConfigDict:
    """The DiT paper's DiT-{S,B,L,XL}/{2,4,8} (MLP ratio 4, no dropout); `overrides` set other
    `config.model` fields, e.g. num_classes=1000, learn_sigma=True as in the paper."""
    if size not in DIT_SIZES:
        raise ValueError(f"DiT size {size!r} is not one of {', '.join(DIT_SIZES)}")
    if patch not in DIT_PATCHES:
        raise ValueError(f"DiT patch size {patch!r} is not one of {DIT_PATCHES}")
    hidden, depth, heads = DIT_SIZES[size]
    return _preset(
        "dit",
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        dropout=0.0,
        **overrides,
    )


def mnist_dit() -> ml_collections.ConfigDict:
    """Class-conditional DiT for MNIST at 28x28x1 on a 2-core CPU: 4x4 patches (7x7 = 49
    tokens), width 128, 6 blocks of 4 heads; 1.8M parameters."""
    return _preset(
        "dit",
        patch_size=4,
        hidden_size=128,
        depth=6,
        num_heads=4,
        mlp_ratio=4.0,
        dropout=0.0,
        num_classes=10,
    )


def mnist() -> ml_collections.ConfigDict:
    """The default run: class-conditional flow matching on the embedded MNIST-5k digits
    (2-core CPU, 8-10 minutes): `mnist_ddpm()`'s data, network, optimizer and steps with
    config.diffusion.process="flow" (logit-normal t), sampled with DPM-Solver++(2M), 20 steps,
    guidance 1.5. It tracks two power-function EMAs for post-hoc EMA (config.phema).

    Chosen by measurement (python -m bench.objectives: 1,000 samples, FD and accuracy of the
    project's MNIST classifier, the same 1200 steps of each objective): flow at guidance 1.5
    with DPM++2M-20 scores FD 6.8 and class accuracy 0.989, against FD 33-34 and 0.91 for the
    v + min-SNR recipe (`mnist_ddpm`) at its best guidance, 3; EDM with the paper's training
    levels 22 / 0.48 (guidance 1) and 74 / 0.70 (guidance 3), with flow's levels (ln sigma ~
    N(0, 1), configs/mnist_edm.py) 7.4 / 0.983 at guidance 1.5.
    """
    config = mnist_ddpm()
    config.diffusion.process = "flow"
    config.sample.method = "dpm++2m"
    config.sample.num_steps = 20
    config.sample.guidance_scale = 1.5
    # Post-hoc EMA (EDM2's two widths): 12 snapshots of 2 EMAs, 2.5 MB each.
    config.phema.track = (0.05, 0.10)
    config.phema.snapshot_every = 100
    return config


def mnist_ddpm() -> ml_collections.ConfigDict:
    """The default run until flow matching replaced it (`mnist()`), and the recipe of the
    MNIST variants (DiT, text, latent, 1-D signals, distillation teacher): class-conditional
    DDPM on the embedded MNIST-5k digits (2-core CPU, 8-10 minutes).

    Recipe chosen by measurement (1200 steps of batch 64, same model, DDIM-50, guidance 2, 100
    samples scored by a CNN trained on MNIST-5k): eps-prediction 61 % of samples classified as
    their label, v-prediction with min-SNR-5 weighting 82 %; the latter at guidance 3: 92 %.
    """
    config = schema.get_config()
    config.data.source = "mnist5k"
    config.data.image_size = 28  # the digits as they are (3 U-Net levels: 28, 14, 7)
    config.data.channels = 1
    config.model = mnist_small()

    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "v"
    config.diffusion.loss_weighting = "min_snr"
    config.diffusion.min_snr_gamma = 5.0

    t = config.training
    t.num_steps = 1200
    t.batch_size = 64
    t.learning_rate = 2e-3
    t.warmup_steps = 200
    t.lr_schedule = "cosine"
    t.ema_decay = 0.999
    t.ema_warmup = True
    t.label_dropout = 0.1
    t.log_every = 100
    t.checkpoint_every = 500
    t.sample_every = 600

    config.sample.method = "ddim"
    config.sample.num_steps = 50
    config.sample.guidance_scale = 3.0
    config.sample.num_samples = 100  # 10 rows (one per digit) of 10
    return config


def mnist_progressive_distillation(
    teacher: ml_collections.ConfigDict,
    teacher_workdir: str,
    guidance: tuple[float, float],
) -> ml_collections.ConfigDict:
    """`teacher`'s MNIST recipe (`mnist()` or `mnist_ddpm()`) as a guided, then progressive,
    distillation student of the run in `teacher_workdir`: guided stage 1 at scales drawn from
    `guidance` (around the teacher's own), then rounds halving DDIM-16 down to 1 step, 140
    train steps each (700 steps of about 5 network passes: no longer than the teacher's 1,200
    of 3). Sampled and evaluated at the teacher's guidance scale."""
    config = teacher
    config.objective = "distill"
    config.model.guidance_embed = True
    config.phema.track = ()
    d = config.distill
    d.teacher_workdir = teacher_workdir
    d.teacher_steps = 16
    d.final_steps = 1
    d.guided = True
    d.guided_steps = 140
    d.steps_per_round = 140
    d.guidance_min, d.guidance_max = guidance

    t = config.training
    t.num_steps = d.guided_steps + 4 * d.steps_per_round  # every round
    t.learning_rate = 3e-4
    t.warmup_steps = 0
    t.lr_schedule = "constant"
    t.ema_decay = 0.96  # a window of ~25 steps: the EMA restarts every round
    t.ema_warmup = False
    t.label_dropout = 0.0
    t.log_every = 50
    t.checkpoint_every = 50  # and at the end of each stage
    t.sample_every = 10_000  # stages end in a grid anyway
    config.sample.method = "ddim"
    config.sample.spacing = "trailing"
    config.sample.num_steps = d.final_steps
    config.eval.metrics = ("fd", "accuracy")  # no bound: a student is no denoiser at every t
    config.eval.guidance_scales = (config.sample.guidance_scale,)
    return config


def edm_cifar10() -> ml_collections.ConfigDict:
    """EDM's class-conditional CIFAR-10 run (Karras et al., 2022, table 7; FID 1.79): the
    DDPM++ network, 200M images in batches of 512 (390,625 steps), Adam at 1e-3 after a
    10M-image warmup, EMA half-life 0.5M images (decay 0.99929 per step), no gradient
    clipping, x-flips, Heun with 18 steps (35 network calls). Not here: the paper's
    non-leaking augmentation pipeline (probability 0.12)."""
    config = cifar10()
    config.model = ddpmpp_cifar10()
    config.diffusion.process = "edm"
    t = config.training
    t.num_steps = 390_625
    t.batch_size = 512
    t.optimizer = "adam"
    t.learning_rate = 1e-3
    t.warmup_steps = 19_531
    t.lr_schedule = "constant"
    t.grad_clip = float("inf")
    t.ema_decay = 0.99929
    t.ema_warmup = True
    t.label_dropout = 0.0  # the paper's conditional model: no guidance
    config.sample.method = "heun"
    config.sample.num_steps = 18
    config.sample.clip_x0 = False
    return config


def cifar10() -> ml_collections.ConfigDict:
    """The DDPM paper's CIFAR-10 run (Ho et al., 2020): the 35.7M-parameter U-Net, linear
    schedule, eps-prediction, 800k steps of batch 128, ancestral sampling with 1000 steps."""
    config = schema.get_config()
    config.data.source = "tfds:cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True
    config.model = ddpm_cifar10()

    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "eps"

    t = config.training
    t.num_steps = 800_000
    t.batch_size = 128
    t.optimizer = "adam"
    t.learning_rate = 2e-4
    t.warmup_steps = 5000
    t.grad_clip = 1.0
    t.ema_decay = 0.9999
    t.label_dropout = 0.0
    t.log_every = 100
    t.checkpoint_every = 10_000
    t.sample_every = 50_000

    config.sample.method = "ddpm"
    config.sample.num_steps = 1000
    config.sample.num_samples = 64
    return config
