"""The taming-transformers VQGAN decoder fixture (`tests/fixtures/tiny_vqgan`): the image
decoder of Chameleon / Lumina-mGPT, which Hugging Face's `ChameleonVQVAE` does not include.

Lumina-mGPT decodes its image tokens with Chameleon's VQGAN, a taming-transformers `VQModel`
(codebook 8192 x 256 used as stored, 1x1 `post_quant_conv`, decoder ch 128, ch_mult
[1, 1, 2, 2, 4], two residual blocks per level plus one, attention only in the middle block).
That decoder is this project's LlamaGen decoder (`llamagen.Decoder`, which follows taming) with
`style="taming"`: no attention in the lowest-resolution level, no l2 normalisation of the
codebook, and taming's key names (`llamagen.taming_names`). This writes a small random one in
taming's names, as a Lightning checkpoint keeps them (encoder and loss weights included, which
the decoder must skip), and the pixels PyTorch decodes from random codes.

    python training/make_vqgan_fixture.py
"""

import json
import os

import torch
from safetensors.torch import save_file

from llamagen import VqArgs, VqModel, taming_names, to_uint8
from make_fixtures import OUT, randomise, rounded


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4321)
    # 3 levels (two upsamplings), channel counts changing between levels (nin_shortcut), a grid
    # with h != w: 3 x 5 codes -> 12 x 20 pixels.
    va = VqArgs(codebook_size=40, codebook_embed_dim=6, z_channels=16, ch=16, ch_mult=[1, 2, 2],
                num_res_blocks=1, norm_groups=8, style="taming")
    vq = VqModel(va).eval()
    randomise(vq, gen, 0.2)
    sd = {k: v.contiguous() for k, v in vq.state_dict().items()}
    stored = taming_names(sd, len(va.ch_mult))
    # what a Lightning checkpoint of taming's VQModel also holds, that the decoder never reads
    stored["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    d = os.path.join(OUT, "tiny_vqgan")
    os.makedirs(d, exist_ok=True)
    save_file({k: v.half() for k, v in stored.items()}, os.path.join(d, "vqgan.safetensors"))
    # Chameleon releases its VQGAN as a PyTorch Lightning checkpoint: the state dict under
    # "state_dict", next to training state that is not tensors.
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.8.6",
                "state_dict": {k: v.half() for k, v in stored.items()}},
               os.path.join(d, "vqgan.ckpt"))
    h, w = 3, 5
    codes = torch.randint(0, va.codebook_size, (1, h, w), generator=gen)
    with torch.no_grad():
        img = vq.decode_code(codes)[0]
    ref = {
        "vq": {"codebook_size": va.codebook_size, "codebook_embed_dim": va.codebook_embed_dim,
               "z_channels": va.z_channels, "ch": va.ch, "ch_mult": va.ch_mult,
               "num_res_blocks": va.num_res_blocks, "norm_groups": va.norm_groups,
               "style": "taming"},
        "grid": [h, w],
        "codes": codes.flatten().tolist(),
        "shape": list(img.shape),
        "pixels": rounded(img),
        "rgb8": to_uint8(img).permute(1, 2, 0).flatten().tolist(),
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print("wrote", d, sorted(stored)[:4], "...", len(stored), "tensors")


if __name__ == "__main__":
    main()
