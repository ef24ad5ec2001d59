"""Records the golden files of the diffusers import tests (tests/test_pretrained.py).

    python tools/make_diffusers_goldens.py tests/assets/diffusers

Needs torch and diffusers (`pip install torch==2.13.0 diffusers==0.42.1`), which are not
project requirements; the tests then run without them. Writes, per tiny random-weight model:
DIR/<name>/{config.json, diffusion_pytorch_model.safetensors, scheduler_config.json} as
`save_pretrained` lays them out, and DIR/<name>/golden.npz with fixed inputs and diffusers'
outputs (NHWC). Also DIR/schedulers.npz (alphas_cumprod of scheduler configs) and
DIR/full_size_shapes.json (state-dict shapes of the real releases' configs, for the
zero-weight conversion test). Every parameter is perturbed from its init so that a swapped
scale/bias or a transposed kernel shows in the outputs.
"""

import json
import os
import sys

import numpy as np

# (name, UNet2DModel fields, scheduler fields, weights dtype)
UNETS = [
    (
        "unet_ddpm",  # the DDPM releases' options: sin-cos embedding, shift 1, padding 0
        dict(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=None,
            norm_num_groups=4,
            norm_eps=1e-6,
            flip_sin_to_cos=False,
            freq_shift=1,
            downsample_padding=0,
        ),
        dict(
            _class_name="DDPMScheduler",
            num_train_timesteps=1000,
            beta_schedule="linear",
            beta_start=0.0001,
            beta_end=0.02,
            variance_type="fixed_large",
            clip_sample=True,
            prediction_type="epsilon",
        ),
        "float16",
    ),
    (
        "unet_class_cond",  # diffusers' defaults: cos-sin, padding 1, eps 1e-5; 2 heads
        dict(
            sample_size=16,
            in_channels=1,
            out_channels=2,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=4,
            resnet_time_scale_shift="scale_shift",
            attn_norm_num_groups=4,  # else diffusers' middle attention has no GroupNorm
            num_class_embeds=10,
        ),
        dict(
            _class_name="DDPMScheduler",
            num_train_timesteps=500,
            beta_schedule="squaredcos_cap_v2",
            variance_type="learned_range",
            prediction_type="epsilon",
            timestep_spacing="trailing",
        ),
        "float16",
    ),
]
# (name, AutoencoderKL fields, weights dtype)
VAES = [
    (
        "vae_kl",  # Stable Diffusion's layout, small: quant convs, middle attention
        dict(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=2,
            norm_num_groups=4,
            scaling_factor=0.5,
        ),
        "float32",
    ),
]
# (name, DiTTransformer2DModel fields, weights dtype)
DITS = [
    (
        "dit",  # DiT-XL/2's layout, small: learned sigma, 10 classes (+ the null class)
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ),
        "float32",
    ),
]
SCHEDULERS = {
    "ddpm_linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "linear_T250": dict(
        beta_schedule="linear", beta_start=0.0002, beta_end=0.03, num_train_timesteps=250
    ),
    "sd_scaled_linear": dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    ),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "zero_snr_v": dict(
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    ),
}
# The real releases' model configs (from their config.json on the Hugging Face hub).
FULL_SIZE = {
    "google/ddpm-cifar10-32": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        dropout=0.1,
    ),
    "google/ddpm-celebahq-256": dict(
        sample_size=256,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=(
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
        ),
        attention_head_dim=None,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
    ),
    "stabilityai/sd-vae-ft-mse": dict(
        _class_name="AutoencoderKL",
        sample_size=256,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    ),
    "facebook/DiT-XL-2-256 (transformer)": dict(
        _class_name="DiTTransformer2DModel",
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ),
}


def _perturb(model, torch, dtype: str) -> None:
    """Every parameter + N(0, 0.1^2), then rounded through `dtype` (what is saved)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(getattr(torch, dtype)).float())


def _unet(out: str, name: str, fields: dict, sched: dict, dtype: str) -> None:
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**fields).eval()
    _perturb(model, torch, dtype)
    folder = os.path.join(out, name)
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    model.float()
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=1)
    rng = np.random.default_rng(0)
    size, channels = fields["sample_size"], fields["in_channels"]
    x = rng.standard_normal((3, channels, size, size)).astype(np.float32)
    t = np.array([0, 37, 999 if "num_class_embeds" not in fields else 499], np.int64)
    labels = np.array([0, 3, 9], np.int64) if "num_class_embeds" in fields else None
    with torch.no_grad():
        kwargs = {} if labels is None else {"class_labels": torch.from_numpy(labels)}
        y = model(torch.from_numpy(x), torch.from_numpy(t), **kwargs).sample.numpy()
    arrays = dict(x=x.transpose(0, 2, 3, 1), t=t, out=y.transpose(0, 2, 3, 1))
    if labels is not None:
        arrays["labels"] = labels
    np.savez(os.path.join(folder, "golden.npz"), **arrays)
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters")


def _vae(out: str, name: str, fields: dict, dtype: str) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(**fields).eval()
    _perturb(model, torch, dtype)
    folder = os.path.join(out, name)
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    size, channels = fields["sample_size"], fields["in_channels"]
    x = rng.standard_normal((2, channels, size, size)).astype(np.float32)
    f = 2 ** (len(fields["block_out_channels"]) - 1)
    z = rng.standard_normal((2, fields["latent_channels"], size // f, size // f))
    z = z.astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x)).latent_dist
        decoded = model.decode(torch.from_numpy(z)).sample.numpy()
    nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)
    np.savez(
        os.path.join(folder, "golden.npz"),
        x=nhwc(x),
        mean=nhwc(posterior.mean),
        logvar=nhwc(posterior.logvar),
        z=nhwc(z),
        decoded=nhwc(decoded),
    )
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters")


def _dit(out: str, name: str, fields: dict, dtype: str) -> None:
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**fields).eval()
    _perturb(model, torch, dtype)
    with torch.no_grad():  # the released checkpoints repeat block 0's embedding in every block
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    folder = os.path.join(out, name)
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    size, channels = fields["sample_size"], fields["in_channels"]
    x = rng.standard_normal((3, channels, size, size)).astype(np.float32)
    t = np.array([0, 37, 999], np.int64)
    labels = np.array([0, 3, 10], np.int64)  # 10: the null class of guidance
    with torch.no_grad():
        y = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(labels)).sample
    np.savez(
        os.path.join(folder, "golden.npz"),
        x=x.transpose(0, 2, 3, 1),
        t=t,
        labels=labels,
        out=y.numpy().transpose(0, 2, 3, 1),
    )
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters")


def _schedulers(out: str) -> None:
    from diffusers import DDPMScheduler

    tables = {}
    for name, fields in SCHEDULERS.items():
        tables[name] = DDPMScheduler(**fields).alphas_cumprod.numpy()
        tables[f"{name}__config"] = np.array(json.dumps(fields))
    np.savez(os.path.join(out, "schedulers.npz"), **tables)


def _full_size(out: str) -> None:
    import diffusers
    import torch

    shapes = {}
    for repo, fields in FULL_SIZE.items():
        fields = dict(fields)
        class_name = fields.pop("_class_name", "UNet2DModel")
        with torch.device("meta"):
            model = getattr(diffusers, class_name)(**fields)
        state = model.state_dict()
        copies = [
            k for k in state if ".norm1.emb." in k and not k.startswith("transformer_blocks.0.")
        ]
        shapes[repo] = {
            "config": {"_class_name": class_name, **fields},
            "shapes": {k: list(v.shape) for k, v in state.items()},
            "parameters": sum(v.numel() for v in state.values()),
            # DiT: without the per-block copies of block 0's time and label embedding
            "unique_parameters": sum(v.numel() for k, v in state.items() if k not in copies),
        }
    with open(os.path.join(out, "full_size_shapes.json"), "w") as f:
        json.dump(shapes, f)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(f"usage: python {argv[0]} OUT_DIR")
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    for name, fields, sched, dtype in UNETS:
        _unet(out, name, fields, sched, dtype)
    for name, fields, dtype in VAES:
        _vae(out, name, fields, dtype)
    for name, fields, dtype in DITS:
        _dit(out, name, fields, dtype)
    _schedulers(out)
    _full_size(out)


if __name__ == "__main__":
    main(sys.argv)
