"""Reading a local diffusers directory: a model's config.json and safetensors weights, and the
scheduler config beside it. NumPy only (the `safetensors` library's NumPy API), no torch.

Accepted layouts, as `huggingface-cli download <repo> --local-dir DIR` leaves them:
  DIR/config.json + DIR/diffusion_pytorch_model.safetensors      (a model; the DDPM releases
      also keep DIR/scheduler_config.json beside it)
  DIR/<unet|transformer|vae>/...  + DIR/scheduler/scheduler_config.json   (a pipeline)
Every failure is a one-line UserError naming the file and what to do.
"""

import dataclasses
import json
import os

import numpy as np

from ddpm.errors import UserError

WEIGHTS = "diffusion_pytorch_model.safetensors"
MODEL_FOLDERS = ("unet", "transformer", "vae")


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """folder: where config.json and the weights were found; class_name: config.json's
    `_class_name`; config: its fields; scheduler: the scheduler config's fields (None when
    the directory has none)."""

    folder: str
    class_name: str
    config: dict
    scheduler: dict | None

    @property
    def weights_path(self) -> str:
        return os.path.join(self.folder, WEIGHTS)

    def tensors(self) -> dict[str, np.ndarray]:
        """The state dict as NumPy arrays in their stored dtypes (bfloat16 via ml_dtypes)."""
        return read_safetensors(self.weights_path)


def refuse(source: str, field: str, value, why: str) -> UserError:
    """The error for a config.json field our networks cannot express."""
    return UserError(f"{source}: {field}={value!r} {why}")


def require_fixed(cfg: dict, fixed: dict[str, tuple], source: str) -> None:
    """Each field of `fixed` (missing: its first accepted value, diffusers' default) must take
    one of the accepted values."""
    for field, accepted in fixed.items():
        value = cfg.get(field, accepted[0])
        if value not in accepted:
            raise refuse(source, field, value, f"is not supported (accepted: {accepted})")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object of config fields")
    return value


def _model_folder(path: str) -> str:
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    found = [f for f in MODEL_FOLDERS if os.path.isfile(os.path.join(path, f, "config.json"))]
    if len(found) == 1:
        return os.path.join(path, found[0])
    if found:
        raise UserError(
            f"{path} is a pipeline with several models ({', '.join(found)}); name one: "
            f"--config.pretrained.path={os.path.join(path, found[0])}"
        )
    raise UserError(
        f"{path} holds no config.json (nor {'/, '.join(MODEL_FOLDERS)}/config.json): not a "
        "diffusers model directory (get one with `huggingface-cli download <repo> --local-dir "
        "DIR` where there is network)"
    )


def _scheduler_config(path: str, folder: str) -> dict | None:
    candidates = [
        os.path.join(folder, "scheduler_config.json"),
        os.path.join(path, "scheduler_config.json"),
        os.path.join(path, "scheduler", "scheduler_config.json"),
        os.path.join(
            os.path.dirname(os.path.abspath(folder)), "scheduler", "scheduler_config.json"
        ),
    ]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return read_json(candidate)
    return None


def read_model_dir(path: str) -> ModelFiles:
    """The model (and scheduler) config of the diffusers directory `path`; the weights file
    must exist (it is read by `ModelFiles.tensors`)."""
    if not os.path.isdir(path):
        raise UserError(f"config.pretrained.path={path!r} is not a directory")
    folder = _model_folder(path)
    config = read_json(os.path.join(folder, "config.json"))
    class_name = config.get("_class_name")
    if not isinstance(class_name, str):
        raise UserError(f"{os.path.join(folder, 'config.json')} has no _class_name field")
    weights = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(weights):
        raise missing_weights(folder, weights)
    return ModelFiles(folder, class_name, config, _scheduler_config(path, folder))


def missing_weights(folder: str, weights: str) -> UserError:
    """The error for a model folder without its safetensors file `weights`."""
    pickled = [f for f in os.listdir(folder) if f.endswith((".bin", ".ckpt", ".pt"))]
    hint = (
        f" (only PyTorch pickles: {', '.join(pickled)}; convert them once where torch is "
        "installed: `DiffusionPipeline.from_pretrained(DIR).save_pretrained(DIR, "
        "safe_serialization=True)`)"
        if pickled
        else ""
    )
    return UserError(f"{weights} does not exist{hint}")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays; a truncated or corrupt file is a
    UserError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from e
