"""A tiny random Chameleon (the architecture of Lumina-mGPT) in Hugging Face layout, and the
logits `transformers` computes for it: `tests/fixtures/tiny_chameleon`.

The weights are saved with `save_pretrained` (config.json with the image-token
`vocabulary_map`, model.safetensors with the VQ encoder's weights too, which the product must
skip). The reference logits are `lm_head(model.model(ids).last_hidden_state)`:
`ChameleonForConditionalGeneration.forward` would set every image token's logit to the float
minimum, because Hugging Face's port does not generate images; Lumina-mGPT does, from these same
logits.

    python training/make_chameleon_fixture.py
"""

import json
import os

import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from make_fixtures import OUT, rounded

IMAGE_CODES = 40  # VQ codes 0..39 as BPE ids 24..63


def image_token_name(code: int) -> str:
    """Chameleon's BPE name of VQ code `code`: IMGIMG, its decimal digits as letters A-J, Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def main():
    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    for i in range(4, 24):
        vocab[f"t{i}"] = i
    # shuffled, as in the real vocabulary: the BPE order is not the code order
    order = torch.randperm(IMAGE_CODES, generator=torch.Generator().manual_seed(7)).tolist()
    for bpe, code in enumerate(order, start=24):
        vocab[image_token_name(code)] = bpe
    cfg = ChameleonConfig(
        vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, vocabulary_map=vocab,
        vq_config={"embed_dim": 4, "num_embeddings": IMAGE_CODES, "latent_channels": 4,
                   "resolution": 16, "in_channels": 3, "base_channels": 32,
                   "channel_multiplier": [1, 2], "num_res_blocks": 1, "attn_resolutions": []},
    )
    model = ChameleonForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    d = os.path.join(OUT, "tiny_chameleon")
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    ids = torch.tensor([[1, 5, 9, 17, 3, 30, 44, 2, 60, 25, 41, 52]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model.lm_head(hidden)[0]
    ref = {"ids": ids[0].tolist(), "logits": [rounded(row) for row in logits],
           "image_codes": IMAGE_CODES}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print("wrote", d, sum(p.numel() for p in model.parameters()), "parameters")


if __name__ == "__main__":
    main()
