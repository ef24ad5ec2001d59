"""Importing diffusers checkpoints (ddpm.pretrained) against outputs recorded from diffusers.

The golden files (tests/assets/diffusers, written by tools/make_diffusers_goldens.py with
torch 2.13 and diffusers 0.42.1) hold tiny random-weight models, their outputs on fixed
inputs, schedulers' alphas_cumprod and the state-dict shapes of real releases.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddpm import build, generate, pretrained, train
from ddpm.config import runs, schema
from ddpm.errors import UserError
from ddpm.pretrained import layout, scheduler

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "diffusers")
GOLDEN_MODELS = ("unet_ddpm", "unet_class_cond", "vae_kl", "dit")


def _imported(folder: str):
    """(config, network, converted params) of a diffusers directory."""
    converted = pretrained.load(folder)
    return converted.config, converted.net, converted.params


def _relative_error(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def _golden_errors(folder: str) -> list[float]:
    """Relative errors of our imported network against the recorded diffusers outputs: the
    denoiser's output, or the autoencoder's posterior mean, log-variance and decoding."""
    config, net, params = _imported(folder)
    golden = np.load(os.path.join(folder, "golden.npz"))
    variables = {"params": params}
    if config.objective == "autoencoder":
        mean, logvar = net.apply(variables, golden["x"], method="encode")
        decoded = net.apply(variables, golden["z"], method="decode")
        pairs = [(mean, "mean"), (logvar, "logvar"), (decoded, "decoded")]
    else:
        labels = golden.get("labels")
        pairs = [(net.apply(variables, golden["x"], golden["t"], labels), "out")]
    return [_relative_error(ours, golden[key]) for ours, key in pairs]


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_imported_models_match_diffusers_outputs(name):
    """unet_ddpm: DDPM's options (sin-cos embedding with shift 1, bottom-right downsample
    padding, one head); unet_class_cond: diffusers' defaults (cos-sin, symmetric padding, eps
    1e-5, two 8-wide heads), scale-shift norm, class embedding, learned sigma; both float16
    weights. vae_kl: Stable Diffusion's VAE layout (quant / post-quant convs, one-head middle
    attention), float32 weights. dit: DiT-XL/2's layout (shift-1 time embedding, column-first
    position embedding, per-block embedding copies, learned sigma), labels incl. the null
    class."""
    errors = _golden_errors(os.path.join(ASSETS, name))
    assert max(errors) < 1e-4, errors


def test_class_embedding_gets_a_zero_null_row():
    config, _, params = _imported(os.path.join(ASSETS, "unet_class_cond"))
    table = params["label_embed"]["embedding"]
    assert config.model.num_classes == 10 and table.shape[0] == 11
    np.testing.assert_array_equal(table[10], 0.0)


def test_deprecated_attention_names_are_renamed():
    old = {"mid_block.attentions.0.query.weight": 1, "mid_block.attentions.0.proj_attn.bias": 2}
    old["down_blocks.0.resnets.0.conv1.weight"] = 3  # not an attention layer: unchanged
    assert layout.rename_deprecated_attention(old) == {
        "mid_block.attentions.0.to_q.weight": 1,
        "mid_block.attentions.0.to_out.0.bias": 2,
        "down_blocks.0.resnets.0.conv1.weight": 3,
    }


def test_schedulers_reproduce_diffusers_alphas_cumprod():
    tables = np.load(os.path.join(ASSETS, "schedulers.npz"))
    names = [k for k in tables.files if not k.endswith("__config")]
    assert len(names) == 5
    for name in names:
        config = schema.get_config()
        scheduler.apply(config, json.loads(str(tables[f"{name}__config"])), name)
        ours = np.asarray(build.process(config).schedule.alpha_bars, np.float64)
        np.testing.assert_allclose(ours, tables[name], rtol=0, atol=1e-6, err_msg=name)


def test_scheduler_fields_map_onto_the_sample_section():
    config = schema.get_config()
    notes = scheduler.apply(
        config,
        dict(
            beta_schedule="scaled_linear",
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            clip_sample=False,
            thresholding=True,
            dynamic_thresholding_ratio=0.99,
            steps_offset=1,
        ),
        "sched",
    )
    assert config.diffusion.prediction == "v" and config.sample.spacing == "trailing"
    assert config.sample.clip_x0 is False and config.sample.dynamic_threshold == 0.99
    assert len(notes) == 1 and "steps_offset=1" in notes[0]


def test_full_size_releases_convert_every_tensor():
    """The real configs (DDPM CIFAR-10 and CelebA-HQ 256, Stable Diffusion's VAE, DiT-XL/2)
    with zero weights of the recorded diffusers state-dict shapes: every tensor mapped, none
    left over, shapes equal, and the parameter count diffusers reports (DiT: without its
    per-block copies of the embedding)."""
    with open(os.path.join(ASSETS, "full_size_shapes.json")) as f:
        releases = json.load(f)
    for repo, release in releases.items():
        start = time.perf_counter()
        family = pretrained.FAMILIES[release["config"]["_class_name"]]
        config = schema.get_config()
        config.model, data_fields = family.model_section(release["config"], repo)
        config.data.update(data_fields)
        zero = np.zeros((), np.float32)  # zero-stride views: no memory for 0.75 B weights
        tensors = {k: np.broadcast_to(zero, s) for k, s in release["shapes"].items()}
        tensors = family.prepare(tensors, repo)
        net = build.model(config)
        target = build.abstract_params(config, net, runs.input_shape(config))
        table = family.rules(config.model, config.data.image_size, tensors)
        params = layout.convert(tensors, table, target, repo)
        count = sum(p.size for p in jax.tree.leaves(params))
        assert count == release["unique_parameters"], repo
        print(f"{repo}: {count:,} parameters converted in {time.perf_counter() - start:.2f} s")


def _copy_model(tmp_path, name="unet_ddpm") -> str:
    folder = str(tmp_path / name)
    shutil.copytree(os.path.join(ASSETS, name), folder)
    return folder


def _edit_json(path: str, **fields) -> None:
    with open(path) as f:
        value = json.load(f)
    value.update(fields)
    with open(path, "w") as f:
        json.dump(value, f)


def test_bad_directories_are_user_errors_naming_the_problem(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        pretrained.config_for(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="holds no config.json"):
        pretrained.config_for(str(tmp_path))

    wrong_class = _copy_model(tmp_path / "a")
    _edit_json(os.path.join(wrong_class, "config.json"), _class_name="UNet3DConditionModel")
    with pytest.raises(UserError, match="_class_name='UNet3DConditionModel' is not supported"):
        pretrained.config_for(wrong_class)

    unsupported = _copy_model(tmp_path / "b")
    _edit_json(os.path.join(unsupported, "config.json"), center_input_sample=True)
    with pytest.raises(UserError, match="center_input_sample=True is not supported"):
        pretrained.config_for(unsupported)

    bad_schedule = _copy_model(tmp_path / "c")
    _edit_json(os.path.join(bad_schedule, "scheduler_config.json"), beta_schedule="sigmoid")
    with pytest.raises(UserError, match="beta_schedule='sigmoid' is not supported"):
        pretrained.config_for(bad_schedule)

    pickled = _copy_model(tmp_path / "d")
    weights = os.path.join(pickled, "diffusion_pytorch_model.safetensors")
    os.rename(weights, os.path.join(pickled, "diffusion_pytorch_model.bin"))
    with pytest.raises(UserError, match="only PyTorch pickles: diffusion_pytorch_model.bin"):
        pretrained.config_for(pickled)

    truncated = _copy_model(tmp_path / "e")
    weights = os.path.join(truncated, "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    config = pretrained.config_for(truncated)  # the weights are read by the import
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        pretrained.import_weights(config, str(tmp_path / "run"))

    wrong_shape = _copy_model(tmp_path / "f")
    _edit_json(os.path.join(wrong_shape, "config.json"), layers_per_block=2)
    config = pretrained.config_for(wrong_shape)
    with pytest.raises(UserError, match="no tensor 'down_blocks.0.resnets.1.norm1.weight'"):
        pretrained.import_weights(config, str(tmp_path / "run2"))


def test_import_mode_gives_a_workdir_every_mode_reads(tmp_path):
    """--mode=import writes config.json + a step-0 checkpoint of the imported weights as EMA
    parameters; sampling restores exactly them, and training fine-tunes from them."""
    folder = _copy_model(tmp_path, "unet_class_cond")
    workdir = str(tmp_path / "run")
    config = pretrained.config_for(folder)
    config.data.source = "mnist5k"
    config.data.image_size = 16
    config.sample.num_steps = 4
    config.sample.num_samples = config.sample.batch_size = 10
    # The warmup's first learning rate is 0: one step leaves the parameters as imported.
    config.training.update(num_steps=1, batch_size=8, warmup_steps=10, log_every=1)
    config.training.update(sample_every=10, checkpoint_every=1)
    pretrained.import_weights(config, workdir)
    with pytest.raises(UserError, match="already holds a run"):
        pretrained.import_weights(config, workdir)

    _, _, expected = _imported(folder)
    objective, mesh = generate.prepare(config, workdir)
    params, step = generate.restore(objective, workdir, mesh)
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)
    png = generate.sample_from_workdir(config, workdir)
    samples = np.load(png.replace(".png", ".npz"))["images"]
    assert samples.shape == (10, 16, 16, 1)

    train.train_and_evaluate(config, workdir)
    params, step = generate.restore(objective, workdir, mesh)
    assert step == 1
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    jax.tree.map(close, jax.device_get(params), expected)


def test_import_through_the_command_line(tmp_path):
    folder = _copy_model(tmp_path)
    command = [
        sys.executable,
        "main.py",
        "--mode=import",
        f"--config=configs/pretrained.py:{folder}",
        f"--workdir={tmp_path / 'run'}",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Imported UNet2DModel (45,259 parameters)" in done.stdout
    saved = runs.load_config(str(tmp_path / "run"))
    assert saved.model.time_embed_order == "sin_cos" and saved.sample.variance == "fixed_large"


@pytest.mark.slow
def test_goldens_regenerated_live_still_match(tmp_path):
    """Records the golden models again with the installed torch + diffusers and checks the
    import against those fresh outputs."""
    pytest.importorskip("diffusers")
    tool = os.path.join(os.path.dirname(ASSETS), "..", "..", "tools", "make_diffusers_goldens.py")
    subprocess.run([sys.executable, tool, str(tmp_path)], check=True, timeout=600)
    for name in GOLDEN_MODELS:
        assert max(_golden_errors(str(tmp_path / name))) < 1e-4, name
