"""A tiny random Emu3 language model (Emu3-Gen's transformer: a Llama decoder with grouped-query
attention and RoPE base 1e6) in Hugging Face layout, and the logits `transformers` computes for
it: `tests/fixtures/tiny_emu3_lm`.

    python training/make_emu3_fixture.py
"""

import json
import os

import torch
from transformers import Emu3ForCausalLM, Emu3TextConfig

from make_chameleon_fixture import randomise_hf
from make_fixtures import OUT, rounded


def main():
    torch.manual_seed(0)
    cfg = Emu3TextConfig(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=1000000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = Emu3ForCausalLM(cfg).eval()
    randomise_hf(model, 21)
    d = os.path.join(OUT, "tiny_emu3_lm")
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    ids = torch.tensor([[1, 5, 9, 17, 3, 30, 44, 2, 60, 25, 41, 52]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"ids": ids[0].tolist(), "logits": [rounded(row) for row in logits]}, f)
    print("wrote", d, sum(p.numel() for p in model.parameters()), "parameters")


if __name__ == "__main__":
    main()
