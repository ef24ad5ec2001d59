"""Writes a tiny random Stable Diffusion pipeline directory with the real layout, and the
goldens of the Stable Diffusion import tests (tests/test_stable_diffusion.py).

    python tools/make_sd_goldens.py tests/assets/sd

Needs torch, diffusers, transformers, tokenizers and peft (`pip install torch==2.13.0
diffusers==0.42.1 transformers==5.23.0 tokenizers==0.23.3 peft==0.21.2`), which are not
project requirements; the tests then run without them. Writes:

  DIR/sd15/  the SD 1.x layout, as `StableDiffusionPipeline.save_pretrained` leaves it:
             model_index.json, unet/ (cross-attention U-Net, conv projections, one head count),
             text_encoder/ (CLIPTextModel, quick-GELU; keys under `text_model.` with the
             `position_ids` buffer, as transformers 4 saved the releases), tokenizer/
             (vocab.json + merges.txt: a byte-level BPE with CLIP's end-of-word suffix,
             learned here on a few sentences, since the real 49,408-token vocabulary cannot be
             downloaded), vae/, scheduler/
             (SD 1.5's PNDM config)
  DIR/sd2/   the SD 2.x options: linear projections, per-level head dims, GELU text encoder
             (transformers 5's keys, without `text_model.`), "!" as the padding token,
             v-prediction DDIM scheduler
  DIR/*/golden.npz  token ids of PROMPTS (truncated and padded to 77), the text encoder's
             last hidden state and its penultimate layer through the final layer norm
             (diffusers' clip_skip=1), U-Net outputs with text conditioning (NHWC), a 4-step
             DDIM pipeline (trailing, down to alpha = 1) at guidance 7.5 from fixed latents
             with a negative prompt per row (its final latents and images),
             and the U-Net output with a random LoRA applied
  DIR/*/pytorch_lora_weights.safetensors  that LoRA, as `save_lora_weights` writes it
  DIR/full_size.json  SD 1.5's and SD 2.1's U-Net configs (with diffusers' defaults filled
             in) and text encoder configs, and their parameter counts (built on the meta
             device, without weights)

`python tools/make_sd_goldens.py --check-lora PIPELINE_DIR LORA_FILE GOLDEN_NPZ` loads a LoRA
exported by this project into diffusers and compares the U-Net's outputs with ours
(GOLDEN_NPZ: written by `python tools/lora_outputs.py PIPELINE_DIR LORA_FILE GOLDEN_NPZ`).
"""

import json
import os
import sys

import numpy as np

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A painting, in the style of Van Gogh: starry night over the city!!",
    "",
    # longer than 77 tokens: truncated to 75 + the start and end tokens
    " ".join(["a very long prompt about a red fox jumping over a lazy dog"] * 8),
]
CORPUS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a painting in the style of van gogh with a starry night over the city",
    "the quick brown fox jumps over the lazy dog",
    "a red fox and a lazy dog in a field of flowers at sunset, highly detailed",
    "portrait of a cat wearing a hat, digital art, trending",
]
LEVEL_CHANNELS = (8, 16, 16)
TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
)
VARIANTS = {
    "sd15": dict(
        unet=dict(attention_head_dim=2, use_linear_projection=False),
        text=dict(hidden_act="quick_gelu"),
        pad_token="<|endoftext|>",
        legacy_text_keys=True,
        scheduler=dict(
            _class_name="PNDMScheduler",
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
            trained_betas=None,
        ),
    ),
    "sd2": dict(
        unet=dict(attention_head_dim=(2, 4, 4), use_linear_projection=True),
        text=dict(hidden_act="gelu"),
        pad_token="!",
        legacy_text_keys=False,
        scheduler=dict(
            _class_name="DDIMScheduler",
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            num_train_timesteps=1000,
            prediction_type="v_prediction",
            set_alpha_to_one=False,
            steps_offset=1,
        ),
    ),
}
# The releases' configs (unet/config.json, text_encoder/config.json on the Hugging Face hub).
FULL_SIZE = {
    "stable-diffusion-v1-5": dict(
        unet=dict(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
        ),
        text=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
        ),
    ),
    "stable-diffusion-2-1": dict(
        unet=dict(
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            block_out_channels=(320, 640, 1280, 1280),
            upcast_attention=True,
        ),
        text=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=512,
        ),
    ),
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _perturb(model, torch, seed: int = 0) -> None:
    """Every parameter + N(0, 0.1^2): a swapped scale/bias or transposed kernel shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _write_tokenizer(folder: str) -> None:
    """A CLIP-format byte-level BPE (vocab.json, merges.txt) learned on CORPUS: the 256 byte
    symbols, each with the end-of-word suffix, the learned merges, the two special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, end_of_word_suffix="</w>", show_progress=False, min_frequency=1
    )
    bpe.train_from_iterator(CORPUS, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    byte_symbols.sort(key=lambda s: ord(s))
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({s: i for i, s in enumerate(dict.fromkeys(vocab))}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def _add_fields(path: str, **fields) -> None:
    """`fields` added to a JSON file: SD 1.5's PNDM config also has clip_sample=false, which
    PNDMScheduler does not take but DDIM and the other schedulers made from it read."""
    with open(path) as f:
        saved = json.load(f)
    with open(path, "w") as f:
        json.dump({**saved, **fields}, f, indent=2, sort_keys=True)


def _legacy_text_keys(path: str) -> None:
    """The text encoder's weights as the SD releases (saved by transformers 4) have them:
    every key under `text_model.`, plus the `position_ids` buffer."""
    from safetensors.numpy import load_file, save_file

    tensors = {f"text_model.{k}": v for k, v in load_file(path).items()}
    positions = TEXT["max_position_embeddings"]
    tensors["text_model.embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
    save_file(tensors, path, metadata={"format": "pt"})


def _tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
    """The pipeline's tokenization: padded to and truncated at 77 -> [N, 77] int64."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    return np.asarray(ids, np.int64)


def _unet_fields(variant: dict, cross_dim: int) -> dict:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=LEVEL_CHANNELS,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        norm_num_groups=4,
        **variant["unet"],
    )


def _pipeline(out: str, name: str, variant: dict):
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.schedulers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    folder = os.path.join(out, name)
    _write_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer = CLIPTokenizer(
        vocab=os.path.join(folder, "tokenizer", "vocab.json"),
        merges=os.path.join(folder, "tokenizer", "merges.txt"),
        pad_token=variant["pad_token"],
        model_max_length=77,
    )
    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT,
        **variant["text"],
    )
    text_encoder = CLIPTextModel(text_config).eval()
    _perturb(text_encoder, torch, 1)
    unet = UNet2DConditionModel(**_unet_fields(variant, TEXT["hidden_size"])).eval()
    _perturb(unet, torch, 2)
    vae = AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.18215,
    ).eval()
    _perturb(vae, torch, 3)
    sched = dict(variant["scheduler"])
    kind = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[
        sched.pop("_class_name")
    ]
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=kind(**sched),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    os.remove(os.path.join(folder, "tokenizer", "tokenizer.json"))  # the releases: vocab + merges
    _add_fields(os.path.join(folder, "scheduler", "scheduler_config.json"), clip_sample=False)
    if variant["legacy_text_keys"]:
        _legacy_text_keys(os.path.join(folder, "text_encoder", "model.safetensors"))

    ids = _tokenize(tokenizer, PROMPTS)
    with torch.no_grad():
        enc = text_encoder(torch.from_numpy(ids), output_hidden_states=True)
        last = enc.last_hidden_state.numpy()
        penultimate = text_encoder.final_layer_norm(enc.hidden_states[-2]).numpy()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 37, 500, 999], np.int64)
    with torch.no_grad():
        unet_out = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(last)).sample
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    # DDIM on the trailing grid down to alpha = 1 (999, 749, 499, 249 -> x_0), which our
    # sampler computes (its leading grid has no steps_offset, see ddpm.pretrained.scheduler)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        steps_offset=0,
        clip_sample=False,
    )
    prompts, negative = [PROMPTS[0], PROMPTS[1]], ["", "blurry"]
    run = dict(
        prompt=prompts,
        negative_prompt=negative,
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=torch.from_numpy(latents),
    )
    with torch.no_grad():
        final = pipe(**run, output_type="latent").images.numpy()
        images = pipe(**run, output_type="np").images
    nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)
    golden = dict(
        prompts=np.array(PROMPTS),
        ids=ids,
        text_last=last,
        text_penultimate=penultimate,
        x=nhwc(x),
        t=t,
        unet_out=nhwc(unet_out.numpy()),
        pipe_prompts=np.array(prompts),
        pipe_negative=np.array(negative),
        pipe_latents=nhwc(latents),
        pipe_final_latents=nhwc(final),
        pipe_images=images,
        lora_out=_lora(folder, unet, x, t, last),
    )
    np.savez(os.path.join(folder, "golden.npz"), **golden)
    print(
        f"{name}: unet {sum(p.numel() for p in unet.parameters()):,}, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()):,} parameters, vocab "
        f"{len(tokenizer)}"
    )


def _lora(folder: str, unet, x: np.ndarray, t: np.ndarray, context: np.ndarray) -> np.ndarray:
    """A rank-2 LoRA on the attention projections (random A and B), saved in diffusers' LoRA
    layout beside the pipeline; -> the U-Net's output with it, NHWC."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=LORA_TARGETS))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        out = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)).sample
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    unet.delete_adapters("default")
    # What the file alone says: loaded back by diffusers, the same outputs.
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        again = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context))
    assert torch.allclose(again.sample, out, rtol=1e-5, atol=1e-5), "LoRA reload differs"
    return out.numpy().transpose(0, 2, 3, 1)


def check_lora(pipeline_dir: str, lora_file: str, golden_npz: str) -> None:
    """Loads `lora_file` (exported by this project) into the pipeline's U-Net with diffusers
    and compares its outputs on golden.npz's inputs with `golden_npz`'s `ours`."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    pipe.load_lora_weights(os.path.dirname(lora_file), weight_name=os.path.basename(lora_file))
    g = np.load(golden_npz)
    with torch.no_grad():
        out = pipe.unet(
            torch.from_numpy(g["x"].transpose(0, 3, 1, 2)),
            torch.from_numpy(g["t"]),
            torch.from_numpy(g["context"]),
        ).sample.numpy()
    diff = np.abs(out.transpose(0, 2, 3, 1) - g["ours"]).max() / np.abs(g["ours"]).max()
    print(f"diffusers with {lora_file} against ours: max relative difference {diff:.2e}")


def _full_size(out: str) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    counts = {}
    for release, fields in FULL_SIZE.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**fields["unet"])
            text = CLIPTextModel(CLIPTextConfig(**fields["text"]))
        counts[release] = {
            "unet_config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
            "text_config": fields["text"],
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "text_parameters": sum(p.numel() for p in text.parameters()),
        }
    with open(os.path.join(out, "full_size.json"), "w") as f:
        json.dump(counts, f, indent=1)
    print(json.dumps({k: [v["unet_parameters"], v["text_parameters"]] for k, v in counts.items()}))


def main(argv: list[str]) -> None:
    if len(argv) == 5 and argv[1] == "--check-lora":
        check_lora(*argv[2:])
        return
    if len(argv) != 2:
        raise SystemExit(f"usage: python {argv[0]} OUT_DIR")
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    for name, variant in VARIANTS.items():
        _pipeline(out, name, variant)
    _full_size(out)


if __name__ == "__main__":
    main(sys.argv)
