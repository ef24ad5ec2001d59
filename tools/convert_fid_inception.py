"""Converts the FID Inception weights from PyTorch (.pth) to the .npz that ddpm.inception reads.

    python tools/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth fid_inception.npz

Run once, on any machine with torch installed (`pip install torch`); training and evaluation
then need neither torch nor network. The .pth is pytorch-fid's release asset
(github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth),
the TF FID Inception graph ported to torch. See README section "FID".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm import inception  # noqa: E402


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(f"usage: python {argv[0]} IN.pth OUT.npz")
    import torch  # only this script needs torch

    state_dict = torch.load(argv[1], map_location="cpu", weights_only=True)
    variables = inception.convert_torch_state_dict(
        {k: v.detach().numpy() for k, v in state_dict.items()}
    )
    inception.save_fid_inception_params(argv[2], variables)
    inception.load_fid_inception_params(argv[2])  # reads back and checks every shape
    print(f"wrote {argv[2]} ({len(state_dict)} torch tensors in)")


if __name__ == "__main__":
    main(sys.argv)
