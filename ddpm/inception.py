"""The FID Inception-v3 network (pytorch-fid's `fid_inception_v3`) in Flax Linen.

A port of torchvision's Inception3 with pytorch-fid's FID blocks (FIDInceptionA / C / E_1 /
E_2: average pools that do not count padding, a max pool in the last block), cut at the
2048-d "pool3" features that FID uses. Module and parameter names follow torch's state_dict
keys (`Mixed_5b.branch1x1.conv.weight` -> `params/Mixed_5b/branch1x1/conv/kernel`), so the
standard FID weights (pt_inception-2015-12-05-6726825d.pth) convert mechanically; see
`tools/convert_fid_inception.py` and the README section "FID".

No network at run time: the weights come from a local `.npz` (`config.eval.inception_weights`).
"""

import functools
import os
from collections.abc import Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm.errors import UserError

FEATURE_DIM = 2048
INPUT_SIZE = 299
_PRECISION = jax.lax.Precision.HIGHEST  # full float32 convs on every backend (no TF32)

Pair = int | tuple[int, int]  # one size for both axes, or (height, width)


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps=1e-3, running stats) + ReLU: [B,H,W,C] -> [B,H2,W2,F]."""

    features: int
    kernel: Pair
    stride: int = 1
    padding: Pair = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = (self.kernel, self.kernel) if isinstance(self.kernel, int) else self.kernel
        pad = (self.padding, self.padding) if isinstance(self.padding, int) else self.padding
        x = nn.Conv(
            self.features,
            kernel,
            strides=self.stride,
            padding=((pad[0], pad[0]), (pad[1], pad[1])),
            use_bias=False,
            precision=_PRECISION,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 average, stride 1, padding 1, padding not counted (torch count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool (padding with -inf, as torch)."""
    return nn.max_pool(x, (3, 3), (stride, stride), ((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/c/d): 35x35, outputs 224 + pool_features channels."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision InceptionB (Mixed_6a): 35x35 -> 17x17, adds 480 channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b..e): 17x17, factorised 7x7 convolutions, 768 channels out."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision InceptionD (Mixed_7a): 17x17 -> 8x8, adds 512 channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (Mixed_7b, avg pool) / FIDInceptionE_2 (Mixed_7c, max pool): 2048 out."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _max_pool_3x3(x, 1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] -> [B, *size, C], as torch F.interpolate(bilinear, align_corners=False).

    Half-pixel centres, no antialiasing when shrinking; the edge taps outside the image get
    weight 0 and the rest are renormalised, which equals torch's clamping of the source index.
    """
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "linear", antialias=False)


class FIDInceptionV3(nn.Module):
    """Images [B, H, W, 3] float32 in [-1, 1] (any H, W) -> pool3 features [B, 2048] float32.

    As pytorch-fid's InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True)
    on the same images in [0, 1]: resize to 299x299 bilinear, then the network.
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        # pytorch-fid resizes images in [0, 1], then maps them to [-1, 1]; bilinear weights sum
        # to 1, so resizing our [-1, 1] images directly is the same map.
        x = resize_bilinear(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1


# torch parameter / buffer name -> (Flax collection, Flax leaf name). Other keys of the FID
# state_dict (fc.*, num_batches_tracked) are not used by the pool3 features.
_LEAF_NAMES = {
    "conv.weight": ("params", "kernel"),
    "bn.weight": ("params", "scale"),
    "bn.bias": ("params", "bias"),
    "bn.running_mean": ("batch_stats", "mean"),
    "bn.running_var": ("batch_stats", "var"),
}


def convert_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """torch FID Inception state_dict (name -> numpy array) -> Flax variables.

    Returns {"params": ..., "batch_stats": ...} for `FIDInceptionV3`, float32. Conv weights
    [O, I, kh, kw] become kernels [kh, kw, I, O]. Raises ValueError naming the missing keys if
    the state_dict lacks any tensor the network needs, or if a shape does not match.
    """
    flat = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        module, _, layer = module.rpartition(".")
        if f"{layer}.{leaf}" not in _LEAF_NAMES or not module:
            continue
        collection, name = _LEAF_NAMES[f"{layer}.{leaf}"]
        array = np.asarray(value, np.float32)
        if name == "kernel":
            array = array.transpose(2, 3, 1, 0)
        flat["/".join((collection, *module.split("."), layer, name))] = array
    return _to_variables(flat, "the torch state_dict")


@functools.cache
def _variable_shapes() -> dict[str, tuple[int, ...]]:
    """'/'-joined Flax variable names of FIDInceptionV3 -> shapes (traced once, no compute)."""
    variables = jax.eval_shape(
        FIDInceptionV3().init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )
    return {k: v.shape for k, v in flax.traverse_util.flatten_dict(variables, sep="/").items()}


def _to_variables(flat: Mapping[str, np.ndarray], source: str) -> dict:
    """'/'-joined names -> nested {"params", "batch_stats"} holding exactly the network's tensors.

    Raises ValueError naming the tensors the network needs that `flat` lacks or has misshapen.
    """
    wrong = [
        f"{k} {flat[k].shape if k in flat else 'missing'} (needs {shape})"
        for k, shape in _variable_shapes().items()
        if k not in flat or flat[k].shape != shape
    ]
    if wrong:
        raise UserError(
            f"{source} does not hold the FID Inception weights (pt_inception-2015-12-05): "
            f"{len(wrong)} tensors missing or misshapen, e.g. {'; '.join(wrong[:3])}"
        )
    return flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): flat[k] for k in _variable_shapes()}
    )


def save_fid_inception_params(path: str, variables: Mapping) -> None:
    """Writes Flax variables {"params", "batch_stats"} as an .npz with '/'-joined keys."""
    flat = flax.traverse_util.flatten_dict(variables, sep="/")
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_fid_inception_params(path: str | None) -> dict:
    """Reads the FID Inception weights converted by tools/convert_fid_inception.py.

    path: a local .npz (config.eval.inception_weights). Returns {"params", "batch_stats"}.
    Raises ValueError if path is unset or missing, with how to make the file.
    """
    if not path or not os.path.isfile(path):
        raise UserError(
            f"config.eval.inception_weights={path!r} is not a file: FID needs the FID Inception "
            "weights as .npz. Download pt_inception-2015-12-05-6726825d.pth from the pytorch-fid "
            "GitHub release 'fid_weights' once, run `python tools/convert_fid_inception.py IN.pth "
            "OUT.npz`, and point config.eval.inception_weights at OUT.npz (README: FID)."
        )
    with np.load(path) as data:
        flat = {k: np.asarray(data[k], np.float32) for k in data.files}
    return _to_variables(flat, path)


def make_feature_fn(variables: Mapping) -> Callable[[jax.Array], jax.Array]:
    """Returns a jitted fn: images [B, H, W, C] float32 in [-1, 1], C in {1, 3} -> [B, 2048].

    variables: {"params", "batch_stats"} from load_fid_inception_params. Grayscale images are
    repeated to 3 channels. Traced once per input shape.
    """
    model = FIDInceptionV3()

    @jax.jit
    def features(variables: Mapping, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UserError(f"images must be [B, H, W, 1 or 3], got shape {images.shape}")
        if images.shape[-1] == 1:
            images = jnp.repeat(images, 3, axis=-1)
        return model.apply(variables, images)

    return functools.partial(features, variables)
