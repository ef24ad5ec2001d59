"""The Flax FID Inception port against pytorch-fid's FID Inception with the same random weights.

Two routes to the independent reference:
- live (slow, only where torch, torchvision and pytorch-fid are installed; they are not in
  requirements-dev.txt, see README "FID"): pytorch-fid's own InceptionV3 module, its weight
  download replaced by a random state_dict, on the same images;
- recorded (default run, no torch): the features that route gave once for a state_dict drawn
  from a fixed seed, stored in tests/assets/fid_inception_golden.npz together with the torch
  state_dict's layout (names and shapes), and re-checked by the live test whenever it runs.
  Rewrite it with `python tests/test_inception.py` in an environment that has torch.
Agreement is measured as max |jax - torch| / max |torch| over all features: < 1e-4.
"""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from ddpm import inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "assets", "fid_inception_golden.npz")
REL_TOL = 1e-4


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _random_state_dict(layout: list[tuple[str, list[int]]], seed: int = 0) -> dict:
    """A torch-named FID Inception state_dict of random numbers that keep activations O(1).

    Convs: He-normal; BatchNorm: gamma ~ U(0.8, 1.2), beta and running mean ~ N(0, 0.1^2),
    running var ~ U(0.8, 1.25), so that every BN statistic changes the output.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            out[key] = np.zeros(shape, np.int64)
            continue
        if key.endswith("weight") and len(shape) > 1:
            value = rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith("running_var"):
            value = rng.uniform(0.8, 1.25, shape)
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        out[key] = value.astype(np.float32)
    return out


def _images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Smooth-ish test images [B, H, W, C] float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    b, h, w, c = shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, (b, 1, 1, c))
    freq = rng.uniform(1, 6, (b, 1, 1, c))
    waves = np.sin(freq * (yy + 0.5 * xx)[None, :, :, None] * 2 * np.pi + phase)
    return np.clip(0.7 * waves + 0.3 * rng.uniform(-1, 1, shape), -1, 1).astype(np.float32)


def _torch_resize_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch's upsample_bilinear2d (align_corners=False) written out: [B,H,W,C] float64."""

    def axis_weights(n_in: int, n_out: int) -> np.ndarray:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)  # clamp below 0
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        m = np.zeros((n_out, n_in))
        np.add.at(m, (np.arange(n_out), i0), 1 - lam)
        np.add.at(m, (np.arange(n_out), i1), lam)
        return m

    wh, ww = axis_weights(x.shape[1], out_h), axis_weights(x.shape[2], out_w)
    return np.einsum("oh,bhwc,pw->bopc", wh, x.astype(np.float64), ww, optimize=True)


@pytest.mark.parametrize(
    "size_in, size_out",
    [((5, 7), (12, 9)), ((28, 28), (299, 299)), ((40, 33), (11, 17)), ((299, 299), (299, 299))],
)
def test_resize_matches_torch_bilinear_formula(size_in, size_out):
    """Within float32 rounding of the source positions (|error| ~ 1e-6 x pixel gradient ~ 2)."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, *size_in, 3)).astype(np.float32)
    got = np.asarray(inception.resize_bilinear(x, size_out))
    np.testing.assert_allclose(got, _torch_resize_reference(x, *size_out), atol=1e-5)


def test_missing_weights_name_the_config_field(tmp_path):
    for path in (None, str(tmp_path / "absent.npz")):
        with pytest.raises(ValueError, match=r"config\.eval\.inception_weights=.*convert_fid"):
            inception.load_fid_inception_params(path)


def test_weights_file_round_trip_and_shape_check(tmp_path):
    rng = np.random.default_rng(0)
    flat = {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in inception._variable_shapes().items()
    }
    path = str(tmp_path / "w.npz")
    np.savez(path, **flat)
    loaded = inception.load_fid_inception_params(path)
    kernel = loaded["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"]
    np.testing.assert_array_equal(kernel, flat["params/Mixed_7c/branch_pool/conv/kernel"])
    del flat["batch_stats/Mixed_6e/branch7x7dbl_5/bn/var"]
    np.savez(path, **flat)
    with pytest.raises(ValueError, match=r"1 tensors missing.*Mixed_6e/branch7x7dbl_5/bn/var"):
        inception.load_fid_inception_params(path)


def _golden() -> tuple[list, np.ndarray]:
    with np.load(GOLDEN) as data:
        return json.loads(str(data["layout"])), data["features"]


def test_features_match_recorded_pytorch_fid_features():
    """The converter + network reproduce pytorch-fid's features for seeded random weights."""
    layout, want = _golden()
    variables = inception.convert_torch_state_dict(_random_state_dict(layout))
    got = np.asarray(inception.make_feature_fn(variables)(_images((2, 64, 64, 3), seed=1)))
    assert got.shape == (2, inception.FEATURE_DIM) and got.dtype == np.float32
    assert _relative_error(got, want) < REL_TOL


def _torch_reference(state_dict: dict, images: np.ndarray) -> np.ndarray:
    """pytorch-fid InceptionV3 pool3 features of [B, H, W, C] images in [-1, 1] -> [B, 2048]."""
    import torch
    from pytorch_fid import inception as fid

    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    with pytest.MonkeyPatch.context() as patch:  # the weights "download" returns ours
        patch.setattr(fid, "load_state_dict_from_url", lambda *args, **kwargs: tensors)
        net = fid.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    x = torch.from_numpy(np.ascontiguousarray(((images + 1) / 2).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return net(x)[0][:, :, 0, 0].numpy()


def _torch_layout() -> list[tuple[str, list[int]]]:
    from pytorch_fid import inception as fid

    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    return [(k, list(v.shape)) for k, v in net.state_dict().items()]


def _load_converter():
    spec = importlib.util.spec_from_file_location(
        "convert_fid_inception", os.path.join(ROOT, "tools", "convert_fid_inception.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_port_matches_live_pytorch_fid(tmp_path):
    """.pth -> tools/convert_fid_inception.py -> .npz -> features, against pytorch-fid."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    pytest.importorskip("pytorch_fid")
    layout = _torch_layout()
    state_dict = _random_state_dict(layout)
    pth, npz = str(tmp_path / "w.pth"), str(tmp_path / "w.npz")
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pth)
    _load_converter().main(["convert_fid_inception.py", pth, npz])
    features = inception.make_feature_fn(inception.load_fid_inception_params(npz))

    rgb, gray = _images((2, 64, 64, 3), seed=1), _images((2, 64, 64, 1), seed=2)
    full = _images((2, 299, 299, 3), seed=3)
    for images in (rgb, gray, full):
        want = _torch_reference(state_dict, images)
        assert _relative_error(np.asarray(features(images)), want) < REL_TOL
    golden_layout, golden = _golden()
    assert golden_layout == [list(e) for e in layout]  # the recorded weights are today's
    assert _relative_error(_torch_reference(state_dict, rgb), golden) < REL_TOL

    # Shrinking too (FID resizes every input to 299, so this path runs for large images).
    x = _images((2, 40, 33, 3), seed=4)
    want = (
        torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
            size=(11, 17),
            mode="bilinear",
            align_corners=False,
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    np.testing.assert_allclose(np.asarray(inception.resize_bilinear(x, (11, 17))), want, atol=1e-5)


def write_golden() -> None:
    """Records pytorch-fid's features for the seeded random weights (needs torch)."""
    layout = _torch_layout()
    features = _torch_reference(_random_state_dict(layout), _images((2, 64, 64, 3), seed=1))
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    np.savez_compressed(
        GOLDEN, layout=np.array(json.dumps(layout)), features=features.astype(np.float32)
    )
    print(f"wrote {GOLDEN}: features {features.shape}, max {features.max():.4g}")


if __name__ == "__main__":
    write_golden()
