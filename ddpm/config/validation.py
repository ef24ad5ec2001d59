"""Start-up validation of a config: every check of a config path lives here (`validate` for
every run, `validate_eval` / `validate_edit_section` for those modes' sections), and each
failure is a `UserError` naming the field and the accepted values, before any compile.

`validate` checks the fields first, then reads what the run derives from them (input shape,
latent diffusion's stage-1 factor, a distillation run's length) in one `ddpm.config.runs.derive`
and checks the fields that must fit those values: runs never calls back here.

The math and model modules check their own arguments (their errors name those); the checks
here run first, so a user sees config paths.
"""

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_collections

from ddpm import (
    autoguide,
    consistency,
    data,
    diffusion,
    likelihood,
    phema,
    processes,
    samplers,
    schedules,
)
from ddpm.config import runs, schema
from ddpm.errors import UserError
from ddpm.models.dit import POS_EMBED_LAYOUTS
from ddpm.models.layers import TIME_EMBED_ORDERS

DTYPES = ("float32", "bfloat16", "float16")
RECON_LOSSES = ("l1", "l2")
GROUP_NORMS = ("auto", "fast", "flax")
INIT_KEYS = ("auto", "rbg", "threefry")
CPU_KERNELS = ("auto", "ynnpack", "xla")


def _fmt(values: Iterable) -> str:
    return ", ".join(str(v) for v in values)


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _field_paths(value, path + ".")
        else:
            yield path


def choice(config: ml_collections.ConfigDict, path: str, choices: Iterable) -> None:
    choices = tuple(choices)
    value = config[path]  # a ConfigDict reads a dotted path
    if value not in choices:
        raise UserError(f"config.{path}={value!r} is not one of {_fmt(choices)}")


def number(
    config: ml_collections.ConfigDict,
    path: str,
    low: float,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
    integer: bool = False,
) -> None:
    """config.<path> must be a number (an int with `integer`) in the stated range."""
    value = config[path]  # a ConfigDict reads a dotted path
    kind = "an int" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        raise UserError(f"config.{path}={value!r} must be {kind}")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = high is None or (value <= high if high_inclusive else value < high)
    if not (ok_low and ok_high):
        bound = f"{'>=' if low_inclusive else '>'} {low}"
        if high is not None:
            bound += f" and {'<=' if high_inclusive else '<'} {high}"
        raise UserError(f"config.{path}={value!r} must be {kind} {bound}")


def _positive_ints(config: ml_collections.ConfigDict, section: str, fields: Iterable[str]) -> None:
    for field in fields:
        number(config, f"{section}.{field}", 1, integer=True)


def check_known_fields(config: ml_collections.ConfigDict) -> None:
    """Every field must exist in the schema (`ddpm.config.schema`), with the model section of
    config.model.name's family: catches typos and fields of another network family."""
    name = config.model.get("name")
    if name not in schema.MODEL_SECTIONS:
        raise UserError(f"config.model.name={name!r} is not one of {_fmt(schema.MODEL_SECTIONS)}")
    reference = schema.get_config()
    reference.model = schema.model_section(name)
    known = set(_field_paths(reference))
    unknown = sorted(set(_field_paths(config)) - known)
    if unknown:
        fields = ", ".join("config." + u for u in unknown)
        hint = "; every field must exist in ddpm/config/schema.py"
        if any(u.startswith("model.") for u in unknown):
            hint += f" (config.model holds the fields of the {name!r} family)"
        raise UserError(f"unknown config field(s): {fields}{hint}")


def validate(
    config: ml_collections.ConfigDict, *, open_data: bool = True
) -> data.DatasetInfo | None:
    """Raises UserError naming the first invalid field; returns the data source's metadata,
    read while validating it (for a folder source that means indexing the folder, so callers
    should not read it again). `open_data=False` checks config.data's fields without opening
    the source and returns None (ahead-of-time compilation needs only the data's shape)."""
    check_known_fields(config)
    _validate_objective(config)
    info = None
    if open_data:
        info = data.dataset_info(config)
    else:
        data.check_fields(config.data)
    _validate_text(config)
    if config.objective != "autoencoder":
        _validate_diffusion(config)
        _validate_sample(config)
    _validate_training(config)
    _validate_latent(config)
    _validate_distill(config)
    _validate_consistency(config)
    _validate_phema(config)
    _validate_lora(config)
    run = runs.derive(config)  # latent diffusion: reads (and checks) its stage-1 run
    _validate_derived(config, run)
    {"unet": _validate_unet, "dit": _validate_dit, "autoencoder": _validate_autoencoder}[
        config.model.name
    ](config, run.input_shape)
    _validate_runtime(config)
    return info


def _validate_objective(config: ml_collections.ConfigDict) -> None:
    choice(config, "objective", schema.OBJECTIVES)
    name, objective = config.model.name, config.objective
    if (objective == "autoencoder") != (name == "autoencoder"):
        raise UserError(
            f"config.objective={objective!r} with config.model.name={name!r}: the autoencoder "
            "objective trains model.name='autoencoder' and the diffusion objectives a denoiser "
            "(unet, dit)"
        )
    workdir = config.latent.autoencoder_workdir
    if objective == "latent" and workdir is None:
        raise UserError(
            "config.objective='latent' needs config.latent.autoencoder_workdir (the stage-1 run)"
        )
    if objective != "latent" and workdir is not None:
        raise UserError(
            f"config.latent.autoencoder_workdir={workdir!r} is set but config.objective="
            f"{objective!r}; set config.objective='latent' for diffusion on its latents"
        )


def _validate_text(config: ml_collections.ConfigDict) -> None:
    t = config.text
    if t.source is None:
        return
    if t.source != "captions" and not t.source.startswith(("npz:", "clip:")):
        raise UserError(
            f"config.text.source={t.source!r} is not one of None, 'captions', 'npz:<path>', "
            "'clip:<Stable Diffusion pipeline dir>'"
        )
    if t.source.startswith("clip:"):
        folder = t.source.removeprefix("clip:")
        for part in ("tokenizer", "text_encoder"):
            if not os.path.isdir(os.path.join(folder, part)):
                raise UserError(
                    f"config.text.source={t.source!r}: {folder} has no {part}/ folder (a "
                    "Stable Diffusion pipeline directory)"
                )
    if config.objective == "autoencoder":
        raise UserError(f"config.text.source={t.source!r}: the autoencoder takes no text")
    if config.model.num_classes is not None:
        raise UserError(
            f"config.text.source={t.source!r} with config.model.num_classes="
            f"{config.model.num_classes}: text models take no class labels (set num_classes None)"
        )
    _positive_ints(config, "text", ("max_length", "width", "num_heads"))
    number(config, "text.depth", 0, integer=True)
    if t.width % t.num_heads:
        raise UserError(
            f"config.text.num_heads={t.num_heads} does not divide config.text.width={t.width}"
        )
    m = config.model
    if m.name == "unet" and not (m.attention_resolutions or m.mid_attention):
        raise UserError(
            f"config.text.source={t.source!r} needs attention blocks for its cross-attention: "
            "set config.model.attention_resolutions or mid_attention=True"
        )


def _validate_process(config: ml_collections.ConfigDict) -> None:
    """config.diffusion.process and the section of a continuous one (edm, flow, vpsde)."""
    process = config.diffusion.process
    choice(config, "diffusion.process", processes.PROCESSES)
    if process == "ddpm":
        return
    if config.model.get("learn_sigma", False):
        raise UserError(
            f"config.model.learn_sigma=True: a learned variance belongs to the ddpm process, "
            f"not to config.diffusion.process={process!r}"
        )
    try:  # each continuous process checks the fields of its section, naming the field
        processes.REGISTRY[process](**config.diffusion[process].to_dict())
    except ValueError as e:
        raise UserError(f"config.diffusion.{process}.{e}") from None


def _validate_diffusion(config: ml_collections.ConfigDict) -> None:
    _validate_process(config)
    choice(config, "diffusion.schedule", schedules.SCHEDULE_NAMES)
    choice(config, "diffusion.prediction", diffusion.PREDICTIONS)
    choice(config, "diffusion.loss_weighting", diffusion.LOSS_WEIGHTINGS)
    number(config, "diffusion.num_timesteps", 1, integer=True)
    number(config, "diffusion.min_snr_gamma", 0, low_inclusive=False)
    d = config.diffusion
    if d.beta_start is not None or d.beta_end is not None:
        choice(config, "diffusion.schedule", ("linear", "scaled_linear"))
        for field in ("beta_start", "beta_end"):
            if d[field] is not None:
                number(config, f"diffusion.{field}", 0, 1, low_inclusive=False)
        if d.beta_start is not None and d.beta_end is not None and d.beta_start > d.beta_end:
            raise UserError(
                f"config.diffusion.beta_start={d.beta_start} is above beta_end={d.beta_end}"
            )
    if config.diffusion.zero_terminal_snr and config.diffusion.prediction != "v":
        raise UserError(
            "config.diffusion.zero_terminal_snr=True needs config.diffusion.prediction='v' "
            f"(got {config.diffusion.prediction!r}): eps is undefined at SNR 0"
        )


def _validate_sample(config: ml_collections.ConfigDict) -> None:
    s = config.sample
    choice(config, "sample.method", samplers.METHODS)
    process = processes.create(config.diffusion, config.model.get("learn_sigma", False))
    if s.spacing is not None:
        choice(config, "sample.spacing", process.spacings)
    choice(config, "sample.variance", diffusion.VARIANCES[:2])
    high = process.max_steps(s.spacing or process.default_spacing(s.method))
    number(config, "sample.num_steps", 1, high, high_inclusive=True, integer=True)
    number(config, "sample.eta", 0, 1, high_inclusive=True)
    number(config, "sample.churn", 0)
    if s.churn > 0 and process.ode_x0_coef != 0.0:
        raise UserError(
            f"config.sample.churn={s.churn}: churn (EDM's S_churn) adds noise along a VE ODE; "
            f"a {process.name} process's ODE runs in its own time "
            f"(config.diffusion.process={process.name!r}): set it to 0"
        )
    number(config, "sample.guidance_scale", 0)
    _positive_ints(config, "sample", ("num_samples", "batch_size"))
    if s.dynamic_threshold is not None:
        number(config, "sample.dynamic_threshold", 0, 1, low_inclusive=False)
    num_classes = config.model.get("num_classes")
    if s.labels is not None:
        if num_classes is None:
            raise UserError(
                f"config.sample.labels={s.labels!r} needs a class-conditional model "
                "(config.model.num_classes is None)"
            )
        number(config, "sample.labels", 0, num_classes, integer=True)
    lora = config.pretrained.lora
    if lora is not None and not os.path.isfile(lora):
        raise UserError(
            f"config.pretrained.lora={lora!r} does not exist (a pytorch_lora_weights.safetensors)"
        )
    if s.negative_prompt is not None and config.text.source is None:
        raise UserError(
            f"config.sample.negative_prompt={s.negative_prompt!r} needs a text model "
            "(config.text.source is None)"
        )
    if s.prompt is not None and config.text.source is None:
        raise UserError(
            f"config.sample.prompt={s.prompt!r} needs a text model (config.text.source is None)"
        )
    if s.guide is not None:
        autoguide.guide_step(s.guide)  # a malformed "step:N"
        if config.objective != "diffusion" or config.model.get("guidance_embed", False):
            raise UserError(
                f"config.sample.guide={s.guide!r}: autoguidance guides a diffusion run "
                f"(config.objective='diffusion', no guidance input); this is "
                f"{config.objective!r}"
            )


def _validate_training(config: ml_collections.ConfigDict) -> None:
    choice(config, "training.optimizer", ("adam", "adamw"))
    choice(config, "training.lr_schedule", ("constant", "cosine"))
    _positive_ints(
        config,
        "training",
        (
            "num_steps",
            "batch_size",
            "grad_accum_steps",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "fsdp",
        ),
    )
    number(config, "training.sample_every", 0, integer=True)
    number(config, "training.learning_rate", 0, low_inclusive=False)
    number(config, "training.fsdp_min_size", 0, integer=True)
    number(config, "training.warmup_steps", 0, integer=True)
    number(config, "training.weight_decay", 0)
    number(config, "training.grad_clip", 0, low_inclusive=False)
    number(config, "training.ema_decay", 0, 1)
    number(config, "training.label_dropout", 0, 1)
    number(config, "training.adam_b2", 0, 1)


def _validate_phema(config: ml_collections.ConfigDict) -> None:
    """config.phema: the tracked and the requested power-EMA widths (`ddpm.phema`)."""
    p = config.phema
    number(config, "phema.snapshot_every", 1, integer=True)
    widths = [("phema.track", v) for v in p.track]
    if p.sigma_rel is not None:
        widths.append(("phema.sigma_rel", p.sigma_rel))
    for field, value in widths:
        if not isinstance(value, (int, float)) or not 0.0 < value < phema.MAX_SIGMA_REL:
            raise UserError(
                f"config.{field}={value!r}: a power EMA's sigma_rel lies in (0, "
                f"{phema.MAX_SIGMA_REL:.4f}); EDM2 uses 0.05 and 0.10"
            )
    if len(set(p.track)) != len(p.track):
        raise UserError(f"config.phema.track={tuple(p.track)!r} names a width twice")


def _validate_lora(config: ml_collections.ConfigDict) -> None:
    """config.lora: adapters train on an imported Stable Diffusion U-Net only."""
    lo = config.lora
    if lo.rank is None:
        return
    number(config, "lora.rank", 1, integer=True)
    if lo.alpha is not None:
        number(config, "lora.alpha", 0, low_inclusive=False)
    choice(config, "lora.base_dtype", ("float32", "bfloat16"))
    if not lo.targets or not all(isinstance(t, str) and t for t in lo.targets):
        raise UserError(
            f"config.lora.targets={tuple(lo.targets)!r} must name diffusers modules, e.g. "
            "('to_q', 'to_k', 'to_v', 'to_out.0')"
        )
    if config.model.get("attention_type") != "transformer" or config.pretrained.path is None:
        raise UserError(
            f"config.lora.rank={lo.rank}: LoRA adapts the U-Net of a Stable Diffusion pipeline "
            "(--config=configs/sd_lora.py:DIR or configs/pretrained.py:DIR)"
        )
    choice(config, "objective", ("latent", "diffusion"))


def _validate_consistency(config: ml_collections.ConfigDict) -> None:
    """config.consistency (objective "consistency"), and sample.method "consistency", which
    only a consistency model samples with."""
    c, method = config.consistency, config.sample.method
    if (config.objective == "consistency") != (method == "consistency"):
        raise UserError(
            f"config.sample.method={method!r} with config.objective={config.objective!r}: a "
            "consistency model samples with method 'consistency', and only it does"
        )
    if config.objective != "consistency":
        return
    if config.sample.spacing not in (None, "karras"):
        raise UserError(
            f"config.sample.spacing={config.sample.spacing!r}: consistency sampling has its "
            "own levels (None or 'karras')"
        )
    if c.teacher_workdir is not None and c.init_workdir is not None:
        raise UserError(
            "config.consistency.teacher_workdir (distillation) and init_workdir (training from "
            "a diffusion run's weights) exclude each other: a distilled student starts from "
            "its teacher"
        )
    choice(config, "consistency.teacher_solver", ("heun", "euler"))
    choice(config, "consistency.curriculum", ("fixed", "ict"))
    choice(config, "consistency.level_sampling", ("uniform", "lognormal"))
    choice(config, "consistency.distance", consistency.DISTANCES)
    choice(config, "consistency.weighting", ("uniform", "inverse_gap"))
    number(config, "consistency.num_levels", 2, integer=True)
    number(config, "consistency.start_levels", 1, integer=True)
    number(config, "consistency.end_levels", c.start_levels, integer=True)
    for field in ("rho", "p_std", "sigma_data"):
        number(config, f"consistency.{field}", 0, low_inclusive=False)
    number(config, "consistency.p_mean", -math.inf)
    number(config, "consistency.target_ema", 0, 1, high_inclusive=False)
    number(config, "consistency.teacher_guidance", 0)
    if c.teacher_guidance != 1.0 and (
        c.teacher_workdir is None or config.model.get("num_classes") is None
    ):
        raise UserError(
            f"config.consistency.teacher_guidance={c.teacher_guidance} guides a teacher's "
            "labels: it needs config.consistency.teacher_workdir and a class-conditional model"
        )


def _validate_distill(config: ml_collections.ConfigDict) -> None:
    """config.distill (objective "distill"), and model.guidance_embed, which only guided
    distillation trains (the run's length bounds training.num_steps: `_validate_derived`)."""
    d, distilling = config.distill, config.objective == "distill"
    guided = distilling and d.guided
    if config.model.get("guidance_embed", False) != guided:
        raise UserError(
            f"config.model.guidance_embed={config.model.get('guidance_embed')!r}: it must be "
            f"{guided} here (True exactly for guided distillation, config.objective='distill' "
            "with config.distill.guided=True)"
        )
    if not distilling:
        return
    if d.teacher_workdir is None:
        raise UserError("config.objective='distill' needs config.distill.teacher_workdir")
    _positive_ints(config, "distill", ("teacher_steps", "final_steps", "steps_per_round"))
    ratio, rest = divmod(d.teacher_steps, d.final_steps)
    if rest or ratio < 2 or ratio & (ratio - 1):
        raise UserError(
            f"config.distill.teacher_steps={d.teacher_steps} must be final_steps="
            f"{d.final_steps} times a power of two >= 2 (each round halves the steps)"
        )
    high = processes.create(config.diffusion).max_steps("trailing")  # ddpm: num_timesteps
    number(config, "distill.teacher_steps", 2, high, integer=True, high_inclusive=True)
    if d.guided:
        number(config, "distill.guided_steps", 1, integer=True)
        number(config, "distill.guidance_min", 0)
        number(config, "distill.guidance_max", d.guidance_min, low_inclusive=False)
        if config.model.get("num_classes") is None and config.text.source is None:
            raise UserError(
                "config.distill.guided=True distils classifier-free guidance: the teacher must "
                "be conditional (config.model.num_classes or config.text.source)"
            )


def _validate_latent(config: ml_collections.ConfigDict) -> None:
    """config.latent: stage 1's loss; stage 2's inputs, scale factor and pixel-only sample
    options (its stage-1 run: `_validate_derived`)."""
    if config.objective == "autoencoder":
        choice(config, "latent.recon_loss", RECON_LOSSES)
        number(config, "latent.kl_weight", 0)
    if config.objective != "latent":
        return
    if config.sample.clip_x0 or config.sample.dynamic_threshold is not None:
        raise UserError(
            f"config.sample.clip_x0={config.sample.clip_x0!r} / config.sample.dynamic_threshold="
            f"{config.sample.dynamic_threshold!r}: clipping to [-1, 1] is for pixels, not "
            "latents; set clip_x0=False and dynamic_threshold=None for latent diffusion"
        )
    if config.data.length is not None:
        raise UserError("config.objective='latent' takes images, not 1-D signals (data.length)")
    if config.latent.scale_factor is not None:
        number(config, "latent.scale_factor", 0, low_inclusive=False)


def _validate_derived(config: ml_collections.ConfigDict, run: runs.Derived) -> None:
    """The fields that must fit what the run derives (`runs.derive`, which has checked that
    latent diffusion's stage-1 run exists and is an autoencoder of the same image shape):
    the image size against the stage-1 factor, a distillation run's training.num_steps
    against its length."""
    f = run.latent_factor
    if f is not None and config.data.image_size % f:
        raise UserError(
            f"config.data.image_size={config.data.image_size} is not divisible by the stage-1 "
            f"autoencoder's downsampling factor {f}"
        )
    if run.distill_length is not None:
        number(
            config, "training.num_steps", 1, run.distill_length, high_inclusive=True, integer=True
        )


def _validate_common_model(config: ml_collections.ConfigDict) -> None:
    m = config.model
    number(config, "model.dropout", 0, 1)
    for field in ("dtype", "param_dtype"):
        choice(config, f"model.{field}", DTYPES)
    if "num_classes" in m and m.num_classes is not None:
        number(config, "model.num_classes", 1, integer=True)
    if "time_embed_freqs" in m and m.time_embed_freqs is not None:
        number(config, "model.time_embed_freqs", 1, integer=True)
    if "time_embed_max_period" in m:
        number(config, "model.time_embed_max_period", 0, low_inclusive=False)
    if "time_embed_order" in m:
        choice(config, "model.time_embed_order", TIME_EMBED_ORDERS)
        number(config, "model.time_embed_freq_shift", 0, 1, high_inclusive=True)


def _validate_conv_levels(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> None:
    """The fields the U-Net and the autoencoder share: levels, attention, groups, heads."""
    m = config.model
    _validate_common_model(config)
    _positive_ints(config, "model", ("ch", "num_res_blocks", "num_groups"))
    if len(m.ch_mult) == 0 or any(not isinstance(c, int) or c < 1 for c in m.ch_mult):
        raise UserError(
            f"config.model.ch_mult={tuple(m.ch_mult)!r} must be a non-empty tuple of positive "
            "ints, e.g. (1, 2, 2)"
        )
    factor = 2 ** (len(m.ch_mult) - 1)
    size = shape[0]
    if size % factor:
        lo = max(factor, size // factor * factor)
        name = "config.data.image_size" if config.data.length is None else "config.data.length"
        if config.objective == "latent":
            name = "the latent size (config.data.image_size / the stage-1 factor)"
        raise UserError(
            f"{name}={size!r} is not divisible by 2^(len(config.model.ch_mult)-1)"
            f"={factor}; sizes that work are multiples of {factor}, e.g. {lo} or {lo + factor} "
            "(or pad the images, or use fewer levels in config.model.ch_mult)"
        )
    levels = [(size // 2**i, m.ch * mult) for i, mult in enumerate(m.ch_mult)]
    resolutions = [r for r, _ in levels]
    if any(r not in resolutions for r in m.attention_resolutions):
        raise UserError(
            f"config.model.attention_resolutions={tuple(m.attention_resolutions)!r} is not a "
            f"subset of the resolutions of the network (resolutions: {_fmt(resolutions)})"
        )
    for _, c in levels:
        if c % m.num_groups:
            raise UserError(
                f"config.model.num_groups={m.num_groups} does not divide the channel count {c} "
                f"(channels: {_fmt(c for _, c in levels)} = config.model.ch * ch_mult)"
            )
    attn_channels = [c for r, c in levels if r in m.attention_resolutions]
    if m.mid_attention:
        attn_channels.append(levels[-1][1])
    field, value = (
        ("head_dim", m.head_dim) if m.head_dim is not None else ("num_heads", m.num_heads)
    )
    for c in attn_channels:
        if not isinstance(value, int) or value < 1 or c % value:
            raise UserError(
                f"config.model.{field}={value!r} does not divide the channel count {c} of an "
                "attention block"
            )


def _validate_unet(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> None:
    m = config.model
    _validate_conv_levels(config, shape)
    number(config, "model.norm_eps", 0, low_inclusive=False)
    choice(config, "model.downsample_padding", (0, 1))
    choice(config, "model.attention_type", ("block", "transformer"))
    _positive_ints(config, "model", ("transformer_depth",))
    if m.attention_type == "transformer" and config.text.source is None:
        raise UserError(
            "config.model.attention_type='transformer' cross-attends to text: set config.text "
            "(e.g. a Stable Diffusion pipeline's, --config=configs/pretrained.py:SD_DIR)"
        )
    if m.time_embed_freqs is None and m.ch // 2 < 1:
        raise UserError(
            f"config.model.ch={m.ch} gives no time-embedding frequencies (ch // 2 = 0); "
            "set config.model.time_embed_freqs"
        )


def _validate_dit(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> None:
    m = config.model
    _validate_common_model(config)
    _positive_ints(config, "model", ("patch_size", "hidden_size", "depth", "num_heads"))
    number(config, "model.mlp_norm_eps", 0, low_inclusive=False)
    choice(config, "model.pos_embed_layout", POS_EMBED_LAYOUTS)
    if len(shape) != 3:
        raise UserError(
            f"config.model.name='dit' takes [H, W, C] inputs; this config gives {shape}"
        )
    height, width, _ = shape
    p = m.patch_size
    if height % p or width % p:
        divisors = [q for q in range(1, min(height, width) + 1) if not height % q + width % q]
        raise UserError(
            f"config.model.patch_size={p} does not divide the input size {height}x{width} "
            f"(config.data.image_size, or the latent size); patch sizes that work: "
            f"{_fmt(divisors)}"
        )
    if m.hidden_size % m.num_heads:
        raise UserError(
            f"config.model.num_heads={m.num_heads} does not divide "
            f"config.model.hidden_size={m.hidden_size}"
        )
    if m.hidden_size % 4:
        raise UserError(
            f"config.model.hidden_size={m.hidden_size} must be divisible by 4 (2-D sin-cos "
            "position embedding)"
        )
    number(config, "model.mlp_ratio", 0, low_inclusive=False)


def _validate_autoencoder(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise UserError(f"the autoencoder takes [H, W, C] images; this config gives {shape}")
    _validate_conv_levels(config, shape)
    number(config, "model.z_channels", 1, integer=True)


def _validate_runtime(config: ml_collections.ConfigDict) -> None:
    if config.runtime.conv_grad_chunk is not None:
        number(config, "runtime.conv_grad_chunk", 0, integer=True)
    choice(config, "runtime.group_norm", GROUP_NORMS)
    choice(config, "runtime.init_key", INIT_KEYS)
    choice(config, "runtime.async_checkpoint", (True, False))
    choice(config, "runtime.cpu_kernels", CPU_KERNELS)


EVAL_METRICS = ("bpd", "fd", "accuracy", "pr", "fid")
EDIT_MODES = ("inpaint", "img2img")
EDIT_MASKS = ("center", "left_half", "random_boxes")


def eval_metric_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """config.eval.metrics as a tuple of names; `--config.eval.metrics=bpd,fd` arrives as the
    one string "bpd,fd", which is split at the commas."""
    return tuple(name.strip() for item in config.eval.metrics for name in item.split(","))


def eval_guidance_scales(config: ml_collections.ConfigDict) -> tuple[float, ...]:
    """config.eval.guidance_scales, or (config.sample.guidance_scale,) when empty."""
    scales = tuple(config.eval.guidance_scales)
    return scales or (float(config.sample.guidance_scale),)


def validate_eval(config: ml_collections.ConfigDict) -> None:
    """config.eval for --mode=eval against the run, before any compile or I/O."""
    e = config.eval
    chosen = eval_metric_names(config)
    unknown = [m for m in chosen if m not in EVAL_METRICS]
    if not chosen or unknown:
        raise UserError(f"config.eval.metrics={chosen!r}: each must be one of {_fmt(EVAL_METRICS)}")
    _positive_ints(config, "eval", ("num_samples", "batch_size", "bpd_examples"))
    _positive_ints(config, "eval", ("bpd_importance_examples", "classifier_steps"))
    _positive_ints(config, "eval", ("bpd_ode_examples",))
    number(config, "eval.bpd_ode_tolerance", 0, 0.1, low_inclusive=False, high_inclusive=True)
    choice(config, "eval.bpd_ode_divergence", likelihood.DIVERGENCES)
    number(config, "eval.bpd_importance_draws", 2, integer=True)
    choice(config, "eval.reference_split", ("train", "test"))
    conditional = config.model.get("num_classes") is not None
    scales = eval_guidance_scales(config)
    if any(s < 0 for s in scales):
        raise UserError(f"config.eval.guidance_scales={scales!r} must be >= 0")
    if not conditional and (scales != (1.0,) or "accuracy" in chosen):
        raise UserError(
            "config.eval.guidance_scales and the accuracy metric need a class-conditional model "
            f"(config.model.num_classes is None); got scales {scales!r}, metrics {chosen!r}"
        )
    if "bpd" in chosen and (
        config.objective != "diffusion"
        or config.data.length is not None
        or config.text.source is not None
    ):
        raise UserError(
            "config.eval.metrics includes bpd, which is defined here for 8-bit pixel data and "
            "label- or unconditional models: not for latent diffusion, 1-D signals or text, "
            "nor for a distilled student (trained for a few DDIM steps, not as a denoiser at "
            "every t, so its bound means nothing)"
        )
    if "fid" in chosen:
        path = e.inception_weights
        if path is None or not os.path.exists(path):
            raise UserError(
                f"config.eval.metrics includes fid but config.eval.inception_weights={path!r} "
                "is not a file: convert the FID Inception weights once (README, 'FID') and "
                "point the field at the .npz"
            )


def edit_input_index(spec) -> int | None:
    """config.edit.input as a test-set index (an int or a string of digits), else None."""
    if isinstance(spec, int):
        return spec
    return int(spec) if isinstance(spec, str) and spec.strip().isdigit() else None


def validate_edit_section(config: ml_collections.ConfigDict, mode: str) -> None:
    """config.edit for --mode=inpaint / img2img, before any compile (no data is read)."""
    if mode not in EDIT_MODES:
        raise ValueError(f"mode={mode!r} is not one of {_fmt(EDIT_MODES)}")
    e = config.edit
    index = edit_input_index(e.input)
    if index is None and not Path(str(e.input)).expanduser().is_file():
        raise UserError(
            f"config.edit.input={e.input!r} is neither a test-set index (an int >= 0) nor an "
            "existing PNG file"
        )
    signal = config.data.length is not None
    if index is None and signal:
        raise UserError(
            f"config.edit.input={e.input!r}: 1-D signal runs take a test-set index as input"
        )
    png_mask = not signal and Path(str(e.mask)).expanduser().is_file()
    if mode == "inpaint" and e.mask not in EDIT_MASKS and not png_mask:
        kinds = f"one of {_fmt(EDIT_MASKS)}" + ("" if signal else " or an existing PNG file")
        raise UserError(f"config.edit.mask={e.mask!r} is not {kinds}")
    number(config, "edit.num_samples", 1, integer=True)
    if mode == "inpaint":
        number(config, "edit.jump_length", 1, integer=True)
        number(config, "edit.resample", 1, integer=True)
    else:
        number(config, "edit.strength", 0, 1, low_inclusive=False, high_inclusive=True)
    if config.objective not in ("diffusion", "latent", "distill", "consistency"):
        raise UserError(
            f"--mode={mode} edits with a diffusion model; config.objective="
            f"{config.objective!r} is not supported"
        )
