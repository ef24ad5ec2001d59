"""A diffusers scheduler config (`DDPMScheduler`, `DDIMScheduler` and the other discrete-time
schedulers' shared fields) as our `config.diffusion` and `config.sample` fields.

The betas are what the weights were trained with; the rest (spacing, clipping, thresholding)
are sampling defaults a command line may override. A value our schedules or samplers cannot
reproduce is refused, naming the field.
"""

import ml_collections

from ddpm.errors import UserError
from ddpm.pretrained.files import refuse

_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned",
}
_SPACINGS = ("leading", "trailing", "linspace")
_BETA_SCHEDULES = ("linear", "scaled_linear")  # the ones with endpoints
_DEFAULT_BETAS = (1e-4, 0.02)  # diffusers' scheduler defaults, whatever the beta_schedule


def _not_supported(source: str, field: str, value, accepted) -> UserError:
    return refuse(source, field, value, f"is not supported (accepted: {accepted})")


def _lookup(sched: dict, field: str, default: str, table, source: str) -> str:
    """sched[field] (default: diffusers'), which must be one of `table`'s keys."""
    value = sched.get(field, default)
    if value not in table:
        raise _not_supported(source, field, value, ", ".join(table))
    return value


def apply(config: ml_collections.ConfigDict, sched: dict, source: str) -> list[str]:
    """Sets config.diffusion's schedule and prediction and config.sample's spacing, variance
    and clipping from the scheduler config `sched` (`source` names it in errors). Returns
    notes on fields that do not apply here (printed by the import)."""
    notes = []
    if sched.get("trained_betas") is not None:
        raise _not_supported(source, "trained_betas", "[...]", "null (a named beta_schedule)")
    name = _lookup(sched, "beta_schedule", "linear", _SCHEDULES, source)
    prediction = _lookup(sched, "prediction_type", "epsilon", _PREDICTIONS, source)
    variance = _lookup(sched, "variance_type", "fixed_small", _VARIANCES, source)
    spacing = _lookup(sched, "timestep_spacing", "leading", _SPACINGS, source)
    if sched.get("clip_sample_range", 1.0) != 1.0:
        raise _not_supported(source, "clip_sample_range", sched["clip_sample_range"], "1.0")
    thresholding = sched.get("thresholding", False)
    if thresholding and sched.get("sample_max_value", 1.0) != 1.0:
        raise _not_supported(source, "sample_max_value", sched["sample_max_value"], "1.0")
    if sched.get("steps_offset", 0):
        notes.append(
            f"{source}: steps_offset={sched['steps_offset']} is not applied (our leading grid "
            "ends at t=0); set config.sample.spacing to choose the grid"
        )

    d = config.diffusion
    d.schedule = _SCHEDULES[name]
    d.num_timesteps = int(sched.get("num_train_timesteps", 1000))
    if name in _BETA_SCHEDULES:
        start = float(sched.get("beta_start", _DEFAULT_BETAS[0]))
        end = float(sched.get("beta_end", _DEFAULT_BETAS[1]))
        if name == "linear":  # ours scales linear betas by 1000 / T (iDDPM); diffusers does not
            start, end = start * d.num_timesteps / 1000, end * d.num_timesteps / 1000
        d.beta_start, d.beta_end = start, end
    d.prediction = _PREDICTIONS[prediction]
    d.zero_terminal_snr = bool(sched.get("rescale_betas_zero_snr", False))
    s = config.sample
    s.spacing = spacing
    s.variance = "fixed_small" if _VARIANCES[variance] == "learned" else _VARIANCES[variance]
    s.clip_x0 = bool(sched.get("clip_sample", True))
    s.dynamic_threshold = (
        float(sched.get("dynamic_thresholding_ratio", 0.995)) if thresholding else None
    )
    if (_VARIANCES[variance] == "learned") != config.model.learn_sigma:
        raise UserError(
            f"{source}: variance_type={variance!r} does not match the model's output channels "
            f"(learned variance: {config.model.learn_sigma})"
        )
    return notes
