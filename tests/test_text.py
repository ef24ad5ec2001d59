"""Text conditioning: tokenizer, measured captions, cross-attention, null context, guidance,
and a tiny text-conditioned U-Net through training, resume and prompt sampling."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import conditioning, generate, samplers, text, train
from ddpm.config import runs, schema
from ddpm.models import init_inputs, null_label
from ddpm.schedules import get_schedule
from tests.test_dit import dit_parameter_count
from tests.test_unet import parameter_count, unet_parameter_count
from tests.test_unet import tiny_config as unet_config
from tests.tiny import create_model
from tests.tiny import tiny_config as tiny_run_config


def text_config(source="captions", **model):
    """A tiny U-Net (attention at 8x8 and in the middle) with cross-attention on text."""
    config = unet_config(16, 1, **model)
    config.text.update(dict(source=source, max_length=6, width=16, depth=1, num_heads=2))
    return config


def noisy_variables(model, config, seed=2):
    """Initial variables plus N(0, 0.1^2) noise (the zero output conv makes fresh outputs 0)."""
    variables = jax.jit(model.init)(
        jax.random.key(1, impl="rbg"), *init_inputs(config, runs.input_shape(config))
    )
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def context_unet():
    """A U-Net taking precomputed context [B, 6, 16] with a mask, and noisy variables."""
    config = text_config("npz:unused.npz")  # create_model reads no file
    model = create_model(config)
    return model, noisy_variables(model, config)


@functools.cache
def jit_apply(model):
    return jax.jit(model.apply)


def _x_t(batch=3):
    x = jax.random.normal(jax.random.key(0), (batch, 16, 16, 1))
    return x, jnp.full((batch,), 300)


def test_tokenizer_words_unknowns_padding_and_truncation():
    tokens = text.tokenize(["A thin, handwritten THREE!", "a zebra 7", ""], max_length=5)
    words = [[text.VOCAB[i] for i in row] for row in tokens]
    assert words[0] == ["a", "thin", "handwritten", "three", "<pad>"]
    assert words[1] == ["a", "<unk>", "7", "<pad>", "<pad>"]
    assert words[2] == ["<pad>"] * 5
    assert text.tokenize(["a b c d e f g"], 3).shape == (1, 3)


def test_caption_table_covers_label_thickness_and_slant():
    table = text.caption_table()
    assert len(table) == len(set(table)) == 90
    assert table[9 * 3 + 3 * 0 + 1] == "a thin handwritten three"
    assert table[9 * 7 + 3 * 1 + 1] == "a handwritten seven"
    assert table[9 * 7 + 3 * 2 + 2] == "a thick handwritten seven slanted right"
    assert all(text.UNK not in row for row in text.tokenize(table, 8))  # all words known


def test_ink_and_slant_of_drawn_strokes():
    """A vertical bar has slant 0; a line drawn with shear 1/2 has slant ~0.5 (-mu11/mu02 is
    its least-squares slope); the ink fraction counts the drawn pixels."""
    size = 28
    image = -np.ones((3, size, size, 1), np.float32)
    image[0, 4:24, 13, 0] = 1.0  # vertical, 1 pixel wide
    image[1, 4:24, 12:15, 0] = 1.0  # vertical, 3 pixels wide
    for r in range(4, 24):  # sheared: leans right by 1/2 column per row upwards
        image[2, r, 4 + (size - 1 - r) // 2, 0] = 1.0
    ink, slant = text.ink_and_slant(jnp.asarray(image))
    np.testing.assert_allclose(ink, [20 / 784, 60 / 784, 20 / 784], rtol=1e-6)
    np.testing.assert_allclose(slant[:2], 0.0, atol=1e-6)
    # Whole-pixel rounding of the shear: the least-squares slope is 0.5 +- 0.03.
    assert abs(float(slant[2]) - 0.5) < 0.03
    ids = text.caption_ids(jnp.asarray(image), jnp.array([1, 1, 1]))
    captions = [text.caption_table()[i] for i in np.asarray(ids)]
    assert captions == ["a thin handwritten one"] * 2 + ["a thin handwritten one slanted right"]


def test_unet_cross_attention_context_mask_and_null(context_unet):
    """Output depends on the context; values at masked positions never reach it; all-masked
    rows (the null condition) equal calling without context."""
    model, variables = context_unet
    apply = jit_apply(model)
    x, t = _x_t(2)
    x = x[:1].repeat(2, 0)
    context = jax.random.normal(jax.random.key(3), (2, 6, 16))
    mask = jnp.array([[True, True, False, False, True, False]] * 2)
    out = apply(variables, x, t, {"context": context, "context_mask": mask})
    assert float(jnp.abs(out[1] - out[0]).max()) > 1e-3  # two contexts, same x and t
    changed = context.at[:, 2:4].set(100.0).at[:, 5].set(-7.0)
    np.testing.assert_array_equal(
        apply(variables, x, t, {"context": changed, "context_mask": mask}), out
    )
    unmasked = apply(variables, x, t, {"context": changed, "context_mask": jnp.ones((2, 6), bool)})
    assert float(jnp.abs(unmasked - out).max()) > 1e-3  # the same change, unmasked, matters
    null = jax.tree.map(lambda n: jnp.full((2, 6), n), null_label(text_config("npz:x.npz")))
    null["context"] = jnp.broadcast_to(null["context"][..., None], (2, 6, 16))
    # Two programs (with and without a context argument): equal up to float rounding.
    np.testing.assert_allclose(apply(variables, x, t, null), apply(variables, x, t), atol=1e-6)


def test_dit_text_tokens_padding_and_empty_captions():
    """A text DiT: captions change the output, and an empty caption (the null condition of
    guidance) equals calling without text."""
    config = text_config()
    config.model = schema.dit()
    config.model.update(patch_size=4, hidden_size=16, depth=1, num_heads=2)
    model = create_model(config)
    variables = noisy_variables(model, config)
    apply = jit_apply(model)
    x, t = _x_t(4)
    x = x[:1].repeat(4, 0)
    tokens = text.tokenize(["a thin three", "a thick seven", "a one", ""], 6)
    out = apply(variables, x, t, {"tokens": tokens})
    assert float(jnp.abs(out[1] - out[0]).max()) > 1e-3
    # Separate programs (with and without tokens): equal up to float rounding.
    np.testing.assert_allclose(out[3], apply(variables, x, t)[3], atol=1e-6)
    np.testing.assert_allclose(
        apply(variables, x, t, jax.tree.map(lambda n: jnp.full((4, 6), n), null_label(config))),
        apply(variables, x, t),
        atol=1e-6,
    )


def test_guidance_with_a_conditioning_pytree_is_one_batched_call():
    """A denoiser whose output is the mean token id: guided DDIM on one step returns
    uncond + s (cond - uncond) with uncond from all-padding tokens, in one model call."""
    schedule = get_schedule("cosine", 10)
    calls = []

    def denoise(x, t, cond):
        calls.append(jax.tree.map(jnp.shape, cond))
        mean = jnp.mean(cond["tokens"].astype(jnp.float32), axis=1)
        return jnp.broadcast_to(mean[:, None], x.shape)  # x0-prediction

    tokens = jnp.array([[3, 4, 0], [5, 0, 0]])
    x0 = samplers.sample(
        denoise,
        schedule,
        (2, 1),
        jax.random.key(0),
        method="ddim",
        num_steps=1,
        prediction="x0",
        guidance_scale=3.0,
        labels={"tokens": tokens},
        null_label={"tokens": 0},
    )
    assert calls == [{"tokens": (4, 3)}]
    np.testing.assert_allclose(x0[:, 0], 3.0 * np.array([7 / 3, 5 / 3]), rtol=1e-6)


def test_precomputed_embeddings_are_looked_up_by_caption(tmp_path):
    captions = text.caption_table()
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(len(captions), 6, 16)).astype(np.float32)
    mask = rng.random((len(captions), 6)) < 0.7
    path = tmp_path / "emb.npz"
    np.savez(path, captions=np.array(captions), embeddings=embeddings, mask=mask)
    config = text_config(f"npz:{path}")
    cond = conditioning.encode(config, ["a handwritten seven", "a thin handwritten three"])
    rows = [captions.index("a handwritten seven"), captions.index("a thin handwritten three")]
    np.testing.assert_array_equal(cond["context"], embeddings[rows])
    np.testing.assert_array_equal(cond["context_mask"], mask[rows])
    with pytest.raises(ValueError, match="no precomputed embedding for 'a purple seven'"):
        conditioning.encode(config, ["a purple seven"])
    config.text.width = 8
    with pytest.raises(ValueError, match=r"config\.text\.width=16"):
        conditioning.encode(config, ["a handwritten seven"])


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("source", "clip", r"config\.text\.source='clip' is not one of None, 'captions'"),
        ("num_heads", 3, r"config\.text\.num_heads=3 does not divide config\.text\.width=16"),
        ("max_length", 0, r"config\.text\.max_length=0 must be an int >= 1"),
    ],
)
def test_invalid_text_config_fails_at_validation(field, value, message):
    config = text_config()
    config.text[field] = value
    with pytest.raises(ValueError, match=message):
        create_model(config)


def test_text_with_class_labels_or_without_attention_is_an_error():
    with pytest.raises(ValueError, match=r"num_classes=10: text models take no class labels"):
        create_model(text_config(num_classes=10))
    with pytest.raises(ValueError, match=r"needs attention blocks"):
        create_model(text_config(attention_resolutions=(), mid_attention=False))


@pytest.mark.slow  # ~40 s on a 2-core CPU; the text models' forward passes run by default
def test_tiny_text_unet_trains_resumes_and_samples_a_prompt(tmp_path, capsys):
    """Captions measured from each digit condition the U-Net through the standard train step;
    resume; then sample mode draws `config.sample.prompt` with guidance."""
    config = tiny_run_config(num_steps=6, log_every=3, checkpoint_every=6, learning_rate=3e-3)
    config.model.num_classes, config.model.attention_resolutions = None, (16,)
    config.text.update(dict(source="captions", max_length=8, width=16, depth=1, num_heads=2))
    config.sample.num_samples = 4  # the training grid's sampler serves sample mode too
    train.train_and_evaluate(config, str(tmp_path))
    config.training.num_steps = 12
    train.train_and_evaluate(config, str(tmp_path))
    assert "Resumed from checkpoint at step 6" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [3, 6, 9, 12]
    assert all(np.isfinite(m["loss"]) for m in lines)
    assert (tmp_path / "samples" / "step_0000012.png").exists()  # grid of "a handwritten <d>"

    config.sample.prompt = "a thin handwritten three"
    png = generate.sample_from_workdir(config, str(tmp_path))
    assert "'a thin handwritten three'" in capsys.readouterr().out
    saved = np.load(png.replace(".png", ".npz"))
    assert saved["images"].shape == (4, 16, 16, 1) and saved["images"].std() > 1.0


def test_mnist_text_and_dit_recipes_have_their_architectures_parameter_counts():
    """The recipes configs/mnist_text.py and configs/mnist_dit.py build networks with exactly
    the parameters counted by hand (exact: a count has no noise). mnist_text: the U-Net's
    count with cross-attention after each of its attention blocks (`unet_parameter_count`),
    plus the text encoder (token table over the vocabulary, L x D learned positions, per
    layer two LayerNorms, q / kv / output projections and an MLP D -> 4D -> D, a final
    LayerNorm) and the learned L x D null context; its null condition is the padding token."""
    from configs import mnist_dit, mnist_text

    config = mnist_text.get_config()
    t = config.text
    d, length = t.width, t.max_length
    dense = lambda cin, cout: cin * cout + cout
    layer = 2 * 2 * d + dense(d, d) + dense(d, 2 * d) + dense(d, d) + dense(d, 4 * d)
    layer += dense(4 * d, d)
    encoder = len(text.VOCAB) * d + length * d + t.depth * layer + 2 * d
    expected = unet_parameter_count(config, context_dim=d) + encoder + length * d
    assert parameter_count(config) == expected
    assert null_label(config) == {"tokens": 0}

    config = mnist_dit.get_config()
    assert parameter_count(config) == dit_parameter_count(config)


def test_workdir_of_an_older_config_stays_compatible(tmp_path):
    """A config.json written before the text and runtime sections and the objective field
    existed resumes with their defaults; turning text conditioning on (other parameters) is
    an error naming the field."""
    config = tiny_run_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["text"], saved["runtime"], saved["objective"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    runs.check_resumable(config, str(tmp_path))
    config.text.source = "captions"
    with pytest.raises(
        ValueError, match=r"config\.text\.source: workdir has None, new config 'captions'"
    ):
        runs.check_resumable(config, str(tmp_path))
