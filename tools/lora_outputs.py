"""Our side of `tools/make_sd_goldens.py --check-lora`: the U-Net of a Stable Diffusion
pipeline with a LoRA file merged (`ddpm.pretrained.lora`), run on the pipeline's golden inputs.

    python tools/lora_outputs.py PIPELINE_DIR LORA_FILE OUT_NPZ
    python tools/make_sd_goldens.py --check-lora PIPELINE_DIR LORA_FILE OUT_NPZ   # torch side

PIPELINE_DIR holds golden.npz (x [B, H, W, C], t [B], text_last [B, 77, D]: written by
make_sd_goldens.py, e.g. tests/assets/sd/sd15); LORA_FILE is a pytorch_lora_weights.safetensors
(e.g. the one `configs/sd_lora.py` training writes into its workdir). OUT_NPZ gets x, t,
context and `ours`, the merged U-Net's output; the second command loads the LoRA into
diffusers and prints the largest difference relative to ours.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm import pretrained  # noqa: E402
from ddpm.pretrained import lora  # noqa: E402


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit(__doc__)
    folder, lora_file, out = argv[1:]
    converted = pretrained.load(folder)
    adapters, scale = lora.read(lora_file)
    merged = lora.merge(converted.params, adapters, scale, lora.unet_table(converted.config))
    golden = np.load(os.path.join(folder, "golden.npz"))
    context = golden["text_last"]
    cond = {"context": jnp.asarray(context), "context_mask": jnp.ones(context.shape[:2], bool)}
    apply = jax.jit(converted.net.apply)
    ours = apply({"params": merged}, golden["x"], golden["t"], cond)
    base = apply({"params": converted.params}, golden["x"], golden["t"], cond)
    change = float(jnp.abs(ours - base).max() / jnp.abs(base).max())
    print(f"the LoRA changes the U-Net's output by {change:.1%} (largest, relative)")
    np.savez(out, x=golden["x"], t=golden["t"], context=context, ours=np.asarray(ours))


if __name__ == "__main__":
    main(sys.argv)
