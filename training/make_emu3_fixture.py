"""Emu3-Gen fixtures, from transformers' own Emu3 classes with tiny random weights.

- `tests/fixtures/tiny_emu3_lm`: the language model alone (`Emu3ForCausalLM`: a Llama decoder
  with grouped-query attention and RoPE base 1e6) and its logits.
- `tests/fixtures/tiny_emu3`: a whole Emu3-Gen folder as transformers saves
  `Emu3ForConditionalGeneration` (config.json with text_config, vq_config and the
  vocabulary_map; the text model and the MoVQ VQ-VAE in one model.safetensors), a word-level
  tokenizer.json with Emu3's special tokens and `<|visual token NNNNNN|>` names, zipar.json
  (the code grid), and reference.json:
  - the logits of the composite model;
  - the pixels the VQ-VAE decodes from random codes (for one image the temporal
    convolutions run on one frame; two temporal up-samplings and batch norms are exercised);
  - the prompt ids of Emu3's generation template (`bos prompt+positive <|image start|>H*W
    <|image token|>`) and of the negative prompt;
  - greedy codes and pass counts of next-token and ZipAR decoding on the end-of-row layout,
    at CFG 1 and CFG 3 (log-probabilities guided against a cache fed the negative prompt, as
    transformers' unbatched guidance does), checked against transformers' `generate` on
    next-token decoding.

    python training/make_emu3_fixture.py
"""

import json
import os

import torch
from transformers import (Emu3Config, Emu3ForCausalLM, Emu3ForConditionalGeneration,
                          Emu3TextConfig)

from make_chameleon_fixture import CachedChameleon, greedy_zipar, randomise_hf
from make_fixtures import OUT, rounded

IMAGE_CODES = 48
# Emu3's special tokens (transformers' Emu3 tokenizer): pad/end of text, BOS, EOS, image
# start and end, the image-size wrapper, end of row, end of frame, the image placeholder.
SPECIAL = ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|image start|>",
           "<|image end|>", "<|image token|>", "<|extra_200|>", "<|extra_201|>", "<image>"]
WORDS = ["a", "red", "apple", "cat", ",", ".", "*", "3", "4", "masterpiece", "film", "grained",
         "best", "quality", "lowres", "bad", "anatomy", "blurry", "text"]
POSITIVE = " masterpiece, film grained, best quality."
NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer "
            "digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, "
            "signature, watermark, username, blurry.")


def write_lm():
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


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


def tiny_emu3(vocab):
    """Text model: 2 layers of width 48, 4 query / 2 key-value heads. VQ-VAE: base 32
    channels x [1, 2] (2x spatial), one residual block per level, attention (2 heads) in the
    middle and the lowest level, 4x temporal factor (two temporal up-samplings)."""
    cfg = Emu3Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=1000000.0,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vq_config=dict(codebook_size=IMAGE_CODES, embed_dim=4, latent_channels=4,
                       base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                       attn_resolutions=[1], hidden_size=64, num_attention_heads=2,
                       temporal_downsample_factor=4),
        vocabulary_map=vocab,
    )
    model = Emu3ForConditionalGeneration(cfg).eval()
    randomise_hf(model.model.text_model, 31)
    randomise_hf(model.lm_head, 32)
    gen = torch.Generator().manual_seed(33)
    with torch.no_grad():
        for name, p in model.model.vqmodel.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
        # spread the output over most of [-1, 1]
        model.model.vqmodel.decoder.conv_out.weight.mul_(6.0)
        for name, b in model.model.vqmodel.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model


def write_tokenizer(d, vocab):
    """A word-level tokenizer with Emu3's special tokens matched whole and no post-processor
    (Emu3's byte-level BPE adds no BOS: the processor writes it into the text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {k: v for k, v in vocab.items() if not k.startswith("<|visual token")}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    tok.save(os.path.join(d, "tokenizer.json"))
    return tok


def emu3_prompt(tok, text, h, w):
    """transformers' Emu3Processor with return_for_image_generation."""
    return tok.encode(f"<|extra_203|>{text}<|image start|>{h}*{w}<|image token|>").ids


def main():
    torch.manual_seed(0)
    vocab = {name: i for i, name in enumerate(SPECIAL + WORDS)}
    # the visual tokens in an order of their own, as in the real vocabulary
    order = torch.randperm(IMAGE_CODES, generator=torch.Generator().manual_seed(8)).tolist()
    for bpe, code in enumerate(order, start=len(vocab)):
        vocab[visual_token(code)] = bpe
    model = tiny_emu3(vocab)
    d = os.path.join(OUT, "tiny_emu3")
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    model = Emu3ForConditionalGeneration.from_pretrained(d).eval()
    tok = write_tokenizer(d, vocab)
    h, w = 3, 4
    with open(os.path.join(d, "zipar.json"), "w") as f:
        json.dump({"grid": [h, w]}, f, indent=1)
    ref = {"image_codes": IMAGE_CODES}

    ids = torch.tensor([[1, 5, 9, 17, 3, 30, 44, 2, 60, 25, 41, 52]])
    with torch.no_grad():
        ref["ids"] = ids[0].tolist()
        ref["logits"] = [rounded(row) for row in model(input_ids=ids).logits[0]]

    # the VQ-VAE: random codes on a 3 x 5 grid (h != w) to pixels
    vh, vw = 3, 5
    codes = torch.randint(0, IMAGE_CODES, (1, vh, vw), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        img = model.model.vqmodel.decode(codes)[0]
    saturated = (img.abs() > 1).float().mean().item()
    assert saturated < 0.2, f"{saturated:.2f} of the pixels are outside [-1, 1]"
    rgb8 = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    ref["vq"] = {"grid": [vh, vw], "codes": codes.flatten().tolist(), "shape": list(img.shape),
                 "pixels": rounded(img), "rgb8": rgb8.permute(1, 2, 0).flatten().tolist()}

    # generation: the template, NTP and ZipAR, CFG 1 and 3
    text = "a red apple"
    ids = emu3_prompt(tok, text + POSITIVE, h, w)
    neg = emu3_prompt(tok, NEGATIVE, h, w)
    img_bpe = [vocab[visual_token(c)] for c in range(IMAGE_CODES)]
    eol = vocab["<|extra_200|>"]

    def cached(m):
        return CachedChameleon(m, m.model.text_model, m.model.text_model.rotary_emb)

    runs = []
    for cfg in (1.0, 3.0):
        for s in (w + 1, 2, 3):
            codes_, passes = greedy_zipar(model, ids, h, w, s, eol, img_bpe, cfg=cfg, uncond=neg,
                                          cached=cached, log_softmax=True)
            runs.append({"cfg": cfg, "window": s, "codes": codes_, "passes": passes})
    # next-token decoding with the cache equals transformers' own generate with unbatched
    # guidance against the negative prompt, greedy, constrained to the image's tokens
    for run in (r for r in runs if r["window"] == w + 1):
        def allowed(_batch, seq):
            i = len(seq) - len(ids)
            return [eol] if i % (w + 1) == w else img_bpe
        kw = dict(guidance_scale=run["cfg"], negative_prompt_ids=torch.tensor([neg])) if run["cfg"] > 1 else {}
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=h * (w + 1), do_sample=False,
                             prefix_allowed_tokens_fn=allowed, **kw)[0, len(ids):].tolist()
        got = [img_bpe.index(t) for i, t in enumerate(out) if i % (w + 1) != w]
        assert got == run["codes"], (run["cfg"], got, run["codes"])
    ref["generate"] = {"prompt": text, "positive": POSITIVE, "negative": NEGATIVE, "ids": ids,
                       "negative_ids": neg, "grid": [h, w], "eol": eol, "runs": runs}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print("wrote", d, "pixels outside [-1, 1]:", saturated,
          "runs:", [(r["cfg"], r["window"], r["passes"]) for r in runs])


if __name__ == "__main__":
    write_lm()
    main()
