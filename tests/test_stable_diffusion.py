"""Stable Diffusion's pieces (ddpm.pretrained) against outputs recorded from transformers and
diffusers.

The golden files (tests/assets/sd, written by tools/make_sd_goldens.py with torch 2.13,
diffusers 0.42.1, transformers 5.23.0 and tokenizers 0.23.3) hold two tiny random pipeline
directories in the releases' layouts (sd15: SD 1.x; sd2: SD 2.x's options), their tokenizers'
ids for fixed prompts, the text encoders' hidden states, and the parameter counts of SD 1.5's
and SD 2.1's full-size configs.
"""

import hashlib
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm import (
    build,
    conditioning,
    data,
    editing,
    generate,
    objectives,
    pretrained,
    samplers,
    train,
)
from ddpm.config import schema
from ddpm.errors import UserError
from ddpm.models.context import ContextSpec
from ddpm.models.unet import unet_from_config
from ddpm.objectives import latent
from ddpm.objectives import lora as lora_objective
from ddpm.pretrained import clip_text, files, layout, lora, scheduler, unet2d_condition
from ddpm.pretrained.clip_tokenizer import ClipTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "tests", "assets", "sd")
VARIANTS = ("sd15", "sd2")


def _golden(variant: str):
    return np.load(os.path.join(ASSETS, variant, "golden.npz"))


def _relative_error(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_ids_equal_transformers(variant):
    """Every id of transformers' CLIPTokenizer: punctuation (SD 2's "!" is its padding token,
    matched as a special token), the empty prompt, a prompt truncated to 77 with its end token
    kept, padding with the folder's token."""
    golden = _golden(variant)
    tokenizer = ClipTokenizer(os.path.join(ASSETS, variant, "tokenizer"))
    ids = tokenizer(list(golden["prompts"]))
    assert ids.dtype == np.int32 and ids.shape == golden["ids"].shape == (4, 77)
    np.testing.assert_array_equal(ids, golden["ids"])
    assert ids[3, -1] == tokenizer.eos_id  # truncated, the end token kept
    assert tokenizer.pad_id == (0 if variant == "sd2" else tokenizer.eos_id)


def test_tokenizer_errors_name_the_file(tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(os.path.join(ASSETS, "sd15", "tokenizer"), folder)
    os.remove(folder / "merges.txt")
    with pytest.raises(UserError, match="no merges.txt"):
        ClipTokenizer(str(folder))
    shutil.copy(os.path.join(ASSETS, "sd15", "tokenizer", "merges.txt"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}))
    with pytest.raises(UserError, match="pad_token '<pad>' is not in vocab.json"):
        ClipTokenizer(str(folder))


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_encoder_equals_transformers(variant):
    """The last hidden state, and with clip_skip=1 the penultimate layer through the final
    norm, within 1e-4 of transformers' CLIPTextModel (SD 1.x: keys under text_model. and
    quick-GELU; SD 2.x: transformers 5's keys and GELU)."""
    golden = _golden(variant)
    ids = jnp.asarray(golden["ids"], jnp.int32)
    for skip, key in ((0, "text_last"), (1, "text_penultimate")):
        net, params = clip_text.load(os.path.join(ASSETS, variant, "text_encoder"), skip)
        out = jax.jit(net.apply)({"params": params}, ids)
        assert _relative_error(out, golden[key]) < 1e-4, (variant, key)


def test_full_size_text_encoders_have_the_released_parameter_counts():
    """SD 1.5's CLIP ViT-L/14 text model (123,060,480) and SD 2.1's OpenCLIP ViT-H/14 without
    its last layer (340,387,840), built from their configs without weights."""
    with open(os.path.join(ASSETS, "full_size.json")) as f:
        releases = json.load(f)
    assert releases["stable-diffusion-v1-5"]["text_parameters"] == 123_060_480
    tokens = jnp.zeros((1, 77), jnp.int32)
    for release in releases.values():
        net = clip_text.encoder(release["text_config"], "config.json")
        shapes = jax.eval_shape(lambda net=net: net.init(jax.random.key(0), tokens))
        count = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
        assert count == release["text_parameters"]


def test_text_encoder_refuses_what_it_cannot_compute(tmp_path):
    folder = tmp_path / "text_encoder"
    shutil.copytree(os.path.join(ASSETS, "sd2", "text_encoder"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(UserError, match="hidden_act='relu' is not one of quick_gelu, gelu"):
        clip_text.load(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    os.remove(folder / "model.safetensors")
    with pytest.raises(UserError, match="model.safetensors does not exist"):
        clip_text.load(str(folder))


def _unet(variant: str, with_table: bool = False):
    """(our U-Net of the pipeline's unet/, its converted parameters[, the converter's module
    table]), with the empty prompt's encoding as the null context."""
    folder = os.path.join(ASSETS, variant, "unet")
    source = os.path.join(folder, "config.json")
    cfg = files.read_json(source)
    config = schema.get_config()
    config.model, data = unet2d_condition.model_section(cfg, source)
    text = unet2d_condition.context_fields(cfg)
    shape = (data["image_size"], data["image_size"], data["channels"])
    net = unet_from_config(config, shape).clone(
        context_spec=ContextSpec(text["max_length"], text["width"])
    )
    weights = os.path.join(folder, files.WEIGHTS)
    tensors = unet2d_condition.prepare(files.read_safetensors(weights), weights)
    x = jnp.zeros((1, *shape))
    context = {
        "context": jnp.zeros((1, 77, text["width"])),
        "context_mask": jnp.ones((1, 77), bool),
    }
    target = jax.eval_shape(lambda: net.init(jax.random.key(0), x, jnp.zeros(1), context))
    table = unet2d_condition.rules(config.model, data["image_size"], tensors)
    params = layout.convert(tensors, table, target["params"], folder)
    return (net, params, table) if with_table else (net, params)


def test_full_size_unets_have_the_released_parameter_counts():
    """SD 1.5's U-Net (859,520,964 parameters) and SD 2.1's (865,910,724) from their
    config.json, without weights; ours adds only the null context (77 x the text width)."""
    with open(os.path.join(ASSETS, "full_size.json")) as f:
        releases = json.load(f)
    assert releases["stable-diffusion-v1-5"]["unet_parameters"] == 859_520_964
    for release in releases.values():
        cfg = release["unet_config"]
        config = schema.get_config()
        config.model, data = unet2d_condition.model_section(cfg, "config.json")
        text = unet2d_condition.context_fields(cfg)
        size, channels = data["image_size"], data["channels"]
        net = unet_from_config(config, (size, size, channels)).clone(
            context_spec=ContextSpec(text["max_length"], text["width"])
        )
        context = {"context": jnp.zeros((1, 77, text["width"]))}
        x = jnp.zeros((1, size, size, channels))
        shapes = jax.eval_shape(
            lambda net=net, x=x, context=context: net.init(
                jax.random.key(0), x, jnp.zeros(1), context
            )
        )
        count = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
        assert count - 77 * text["width"] == release["unet_parameters"]


def _text(variant: str):
    """encode(texts) -> the text encoder's last hidden state [N, 77, D] of the pipeline."""
    tokenizer = ClipTokenizer(os.path.join(ASSETS, variant, "tokenizer"))
    encoder, params = clip_text.load(os.path.join(ASSETS, variant, "text_encoder"))
    apply = jax.jit(encoder.apply)
    return lambda texts: apply({"params": params}, jnp.asarray(tokenizer(texts)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_ddim_pipeline_equals_diffusers(variant):
    """diffusers' StableDiffusionPipeline, 4 DDIM steps at guidance 7.5 from fixed latents,
    a negative prompt per row ("" and "blurry"), then the VAE: our pieces (text encoder, the
    U-Net with the negative prompt's encoding as its null context, one lax.scan of DDIM from
    the scheduler config, the imported VAE) give its final latents and images within 1e-4
    (SD 2.x: v-prediction)."""
    golden = _golden(variant)
    folder = os.path.join(ASSETS, variant)
    encode = _text(variant)
    net, params = _unet(variant)
    config = schema.get_config()
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    scheduler.apply(config, files.read_json(sched), sched)
    assert not config.sample.clip_x0
    process = build.process(config)
    denoise = process.denoiser(lambda p, x, t, y: net.apply({"params": p}, x, t, y))
    null = {"context": 0.0, "context_mask": False}

    @jax.jit
    def ddim(params, context, latents):
        cond = {"context": context, "context_mask": jnp.ones(context.shape[:2], bool)}
        return samplers.sample(
            lambda x, t, y: denoise(params, x, t, y),
            process,
            latents.shape,
            jax.random.key(0),
            labels=cond,
            guidance_scale=7.5,
            noise=latents,
            method="ddim",
            num_steps=4,
            spacing="trailing",
            prediction=process.prediction,
            null_label=null,
        )

    finals = []
    for i, (prompt, negative) in enumerate(
        zip(golden["pipe_prompts"], golden["pipe_negative"], strict=True)
    ):
        negative_params = {**params, "context": {"null_context": encode([str(negative)])[0]}}
        finals.append(
            ddim(negative_params, encode([str(prompt)]), golden["pipe_latents"][i : i + 1])
        )
    final = jnp.concatenate(finals)
    assert _relative_error(final, golden["pipe_final_latents"]) < 1e-4
    vae = pretrained.load(os.path.join(folder, "vae"))
    scale = files.read_json(os.path.join(folder, "vae", "config.json"))["scaling_factor"]
    decoded = vae.net.apply({"params": vae.params}, final / scale, method="decode")
    images = np.clip(np.asarray(decoded) / 2 + 0.5, 0, 1)
    assert np.abs(images - golden["pipe_images"]).max() < 1e-4


def test_pipeline_import_and_text_to_image(tmp_path):
    """--mode=import of the pipeline directory writes the U-Net, whose null context is the
    empty prompt's encoding; --mode=sample with a prompt decodes 64x64 RGB images through
    the pipeline's VAE; a negative prompt "" is the same as none, another one changes the
    unconditional input."""
    folder = os.path.join(ASSETS, "sd15")
    workdir = str(tmp_path / "run")
    config = pretrained.config_for(folder)
    assert (config.objective, config.text.source) == ("latent", f"clip:{folder}")
    assert (config.data.image_size, config.data.channels, config.sample.guidance_scale) == (
        64,
        3,
        7.5,
    )
    config.sample.update(method="ddim", num_steps=3, prompt=str(_golden("sd15")["prompts"][0]))
    pretrained.import_weights(config, workdir)
    objective, mesh = generate.prepare(config, workdir)
    params, step = generate.restore(objective, workdir, mesh)
    empty = clip_text.encode_prompts(folder, [""])[0]
    np.testing.assert_allclose(params["context"]["null_context"], empty, rtol=1e-6)

    png = generate.sample_from_workdir(config, workdir)
    samples = np.load(png.replace(".png", ".npz"))["images"]
    assert samples.shape == (4, 64, 64, 3) and samples.std() > 0

    # The negative prompt is the null context: "" gives the imported one, bit for bit (so the
    # same samples), another prompt another one.
    null = params["context"]["null_context"]
    for negative, same in (("", True), ("blurry", False)):
        config.sample.negative_prompt = negative
        guided = conditioning.with_negative_prompt(config, params)["context"]["null_context"]
        assert np.array_equal(guided, null) == same, negative


def test_pipelines_we_cannot_run_are_refused_by_field(tmp_path):
    folder = tmp_path / "sdxl"
    shutil.copytree(os.path.join(ASSETS, "sd15"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"})
    )
    with pytest.raises(UserError, match="text_encoder_2"):
        pretrained.config_for(str(folder))
    (folder / "model_index.json").write_text(json.dumps(index))
    unet = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(
        json.dumps({**unet, "addition_embed_type": "text_time"})
    )
    with pytest.raises(UserError, match="addition_embed_type='text_time'"):
        pretrained.config_for(str(folder))
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(UserError, match="has no tokenizer/ folder"):
        pretrained.config_for(str(folder))


@pytest.mark.parametrize("variant", VARIANTS)
def test_unet_and_lora_equal_diffusers(variant, tmp_path):
    """The text-conditioned U-Net's output within 1e-4 of diffusers' at t = 0, 37, 500, 999
    (SD 1.x: 1x1-conv projections, 2 heads everywhere; SD 2.x: linear projections, per-level
    head counts of one width); with the context masked out it is the empty prompt's. A rank-2
    LoRA (alpha 3) on every attention projection, saved by diffusers: merged into our
    weights, the output within 1e-4 of diffusers' with the adapter (and what sampling merges
    at lora_scale 0.5 is half of it); written back in the same layout, it reads back equal."""
    golden = _golden(variant)
    net, params, table = _unet(variant, with_table=True)
    apply = jax.jit(net.apply)
    context = jnp.asarray(golden["text_last"])
    valid = jnp.ones(context.shape[:2], bool)
    out = apply(
        {"params": params}, golden["x"], golden["t"], {"context": context, "context_mask": valid}
    )
    assert _relative_error(out, golden["unet_out"]) < 1e-4
    null = apply(
        {"params": params}, golden["x"], golden["t"], {"context": context, "context_mask": ~valid}
    )
    empty = {"context": jnp.broadcast_to(context[2], context.shape), "context_mask": valid}
    assert golden["prompts"][2] == ""
    reference = apply({"params": params}, golden["x"], golden["t"], empty)
    np.testing.assert_allclose(null, reference, rtol=1e-5, atol=1e-5)

    path = os.path.join(ASSETS, variant, "pytorch_lora_weights.safetensors")
    adapters, scale = lora.read(path)
    # 7 transformers (2 down, 1 middle, 4 up) x 2 attentions x q, k, v, out
    assert scale == 1.5 and len(adapters) == 7 * 2 * 4
    merged = lora.merge(params, adapters, scale, table)
    cond = {"context": context, "context_mask": valid}
    out = apply({"params": merged}, golden["x"], golden["t"], cond)
    assert _relative_error(out, golden["lora_out"]) < 1e-4
    assert _relative_error(golden["unet_out"], golden["lora_out"]) > 0.1  # the LoRA matters
    config = pretrained.config_for(os.path.join(ASSETS, variant))  # what sampling merges
    config.pretrained.lora, config.pretrained.lora_scale = path, 0.5
    half = lora.apply_to(config, jax.device_put(params))
    expected = lora.merge(params, adapters, 0.5 * scale, table)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(half), expected)

    written = str(tmp_path / "pytorch_lora_weights.safetensors")
    lora.write(written, adapters, alpha=3.0)
    again, again_scale = lora.read(written)
    assert again_scale == scale and again.keys() == adapters.keys()
    for module, pair in adapters.items():
        for leaf in pair:
            np.testing.assert_array_equal(again[module][leaf], pair[leaf])
    with pytest.raises(UserError, match="no such dense layer"):
        lora.merge(params, {"mid_block.nothing.to_q": adapters[next(iter(adapters))]}, 1.0, table)


def _captioned_images(root) -> str:
    """4 RGB 64x64 discs, red or blue, each with its caption in a .txt beside it."""
    os.makedirs(root)
    yy, xx = np.mgrid[:64, :64]
    for i in range(4):
        image = np.zeros((64, 64, 3), np.uint8)
        image[(yy - 32) ** 2 + (xx - 32) ** 2 < (12 + 4 * i) ** 2, 2 * (i % 2)] = 255
        Image.fromarray(image).save(os.path.join(root, f"{i}.png"))
        with open(os.path.join(root, f"{i}.txt"), "w") as f:
            f.write(["a red disc", "a blue disc"][i % 2])
    return str(root)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _lora_run(tmp_path) -> tuple:
    """configs/sd_lora.py on the tiny SD 1.x pipeline and a captioned folder, 24 steps at
    1e-2 without grids -> (config, workdir, the U-Net file's sha256 before)."""
    folder = os.path.join(ASSETS, "sd15")
    images = _captioned_images(tmp_path / "images")
    before = _sha256(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    spec = importlib.util.spec_from_file_location("sd_lora", f"{ROOT}/configs/sd_lora.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config(f"{folder},{images}")  # as --config=configs/sd_lora.py:...
    assert config.sample.prompt == "a red disc" and config.lora.rank == 4
    config.training.update(num_steps=24, checkpoint_every=12, sample_every=0, learning_rate=1e-2)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)  # what --mode=train runs
    return config, workdir, before


def test_lora_fine_tune_on_a_captioned_folder(tmp_path):
    """Only the rank-4 adapters (56 attention projections) are in the checkpoints; the
    pipeline's U-Net file is unchanged and the frozen base equals a fresh conversion bit for
    bit; the loss on fixed draws of the folder falls; the exported
    pytorch_lora_weights.safetensors holds the trained adapters, and merging it into the base
    gives the weights the workdir samples with."""
    config, workdir, before = _lora_run(tmp_path)
    folder = config.pretrained.path
    assert _sha256(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")) == before
    mesh = build.mesh(config)
    objective = objectives.create(config, workdir=workdir, mesh=mesh)
    fresh = pretrained.load(folder).params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(objective.frozen["base"]), fresh)
    adapters, step = build.restore_ema_into(config, workdir, objective.placed_params(mesh))
    trained = lora_objective.flatten(jax.device_get(adapters))
    assert step == 24 and len(trained) == 56
    assert sum(a.size for a in jax.tree.leaves(trained)) == 6720

    # The loss of the folder's 4 images at 16 fixed (t, noise) draws each: with the base
    # model (what training starts from) and with the trained adapters.
    info = data.dataset_info(config)
    batch = next(data.create_dataset(config, "train", batch_size=4, seed=0, shuffle=False))
    batch = conditioning.attach_captions(batch, conditioning.caption_table(config, info))
    keys = jax.random.split(jax.random.key(7), 16)
    losses = jax.jit(jax.vmap(objective.loss, in_axes=(None, None, None, 0)))

    def mean_loss(params):
        return float(np.mean(losses(params, objective.frozen, batch, keys)[0]))

    start = mean_loss(jax.tree.map(jnp.zeros_like, adapters))  # B = 0: the base
    end = mean_loss(adapters)
    assert end < 0.9 * start, (start, end)

    exported, scale = lora.read(os.path.join(workdir, "pytorch_lora_weights.safetensors"))
    assert scale == 1.0 and exported.keys() == trained.keys()
    jax.tree.map(np.testing.assert_array_equal, exported, trained)
    sampled, _ = generate.restore(objective, workdir, mesh)  # merged in a compiled call
    expected = lora.merge(fresh, exported, scale, objective.table)  # op by op
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        jax.device_get(sampled),
        jax.device_get(expected),
    )


@pytest.mark.slow
def test_lora_run_resumes_exactly(tmp_path):
    """A copy of the LoRA run stopped at its step-12 checkpoint, resumed, ends where the run
    does at 24, bit for bit (adapters, optimizer state and data position restored; the base
    converted again)."""
    config, workdir, _ = _lora_run(tmp_path)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns("24"))
    train.train_and_evaluate(config, resumed)
    mesh = build.mesh(config)
    target = objectives.create(config, workdir=workdir, mesh=mesh).placed_params(mesh)
    ends = [build.restore_ema_into(config, w, target)[0] for w in (workdir, resumed)]
    jax.tree.map(np.testing.assert_array_equal, *jax.device_get(ends))


@pytest.mark.slow  # 30 s of compiling: kept out of CI's 15 minutes (-m slow runs it)
def test_img2img_and_inpaint_a_latent_pipeline_with_a_prompt(tmp_path):
    """--mode=inpaint / img2img of an imported pipeline edit its latents: the input PNG is
    encoded, the mask min-pooled to the latents, the prompt encoded, the results decoded.
    A mask that keeps every pixel, and SDEdit at a strength that keeps no step, give the
    VAE's reconstruction of the input; regenerating the left half changes it (one compiled
    inpainting sampler for both masks)."""
    folder = os.path.join(ASSETS, "sd15")
    workdir = str(tmp_path / "run")
    config = pretrained.config_for(folder)
    config.sample.update(method="ddim", num_steps=3, prompt="a red disc")
    pretrained.import_weights(config, workdir)
    images = _captioned_images(tmp_path / "images")
    white = str(tmp_path / "keep_all.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(white)
    config.edit.update(input=os.path.join(images, "0.png"), mask=white, num_samples=2)

    def results(mode: str) -> np.ndarray:
        png = editing.edit_from_workdir(config, workdir, mode)
        return np.load(png.replace(".png", ".npz"))["images"][-2:].astype(np.float32)

    objective, _ = generate.prepare(config, workdir)
    x, _ = editing.load_input(config)
    stage1 = objective.stage1_apply
    scale = objective.config.latent.scale_factor
    latents = latent.encode_latents(
        stage1, objective.frozen, x[None], None, scale_factor=scale, sample_posterior=False
    )
    decoded = latent.decode_latents(stage1, objective.frozen, latents, scale_factor=scale)
    expected = np.round(np.clip(np.asarray(decoded[0]) / 2 + 0.5, 0, 1) * 255)
    assert np.abs(results("inpaint") - expected).max() <= 1  # uint8 rounding of one image
    config.edit.strength = 0.2  # floor(0.2 * 3) = 0 steps: the encoded input, decoded
    assert np.abs(results("img2img") - expected).max() <= 1
    config.edit.mask = "left_half"
    assert np.abs(results("inpaint") - expected).mean() > 5
