"""Stable Diffusion's pieces (ddpm.pretrained) against outputs recorded from transformers and
diffusers.

The golden files (tests/assets/sd, written by tools/make_sd_goldens.py with torch 2.13,
diffusers 0.42.1, transformers 5.23.0 and tokenizers 0.23.3) hold two tiny random pipeline
directories in the releases' layouts (sd15: SD 1.x; sd2: SD 2.x's options), their tokenizers'
ids for fixed prompts, the text encoders' hidden states, and the parameter counts of SD 1.5's
and SD 2.1's full-size configs.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm.errors import UserError
from ddpm.pretrained import clip_text
from ddpm.pretrained.clip_tokenizer import ClipTokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "sd")
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
