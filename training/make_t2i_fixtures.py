"""Writes tests/fixtures/tiny_t2i_text: a tiny LlamaGen text-to-image model with its own tiny
FLAN-T5-style encoder, and reference outputs, for the Rust caption tests (tests/t2i.rs).

- A tokenizer trained on a few sentences with the `tokenizers` package, in T5's layout
  (Unigram, Metaspace, `<pad>` = 0, `</s>` = 1 appended, `<unk>` = 2).
- A random `transformers` T5EncoderModel with gated-GELU feed-forward layers as in FLAN-T5,
  saved in Hugging Face layout as sharded safetensors (model.safetensors.index.json).
- A random t2i GPT (llamagen.py) whose caption length is 12, so that the captions below are
  padded (and the longest one truncated).

The references follow LlamaGen's sampler (autoregressive/sample/sample_t2i.py and generate()):
the captions are tokenised with padding to 12 and encoded with the padding mask; the padding is
moved to the left; padded rows are zeroed; the same mask hides the padded slots from every query
except the slot itself, for the conditional and the unconditional caption alike. The captions
are plain lower-case text, for which LlamaGen's caption cleaning only lower-cases and trims.

    python training/make_t2i_fixtures.py     # needs torch, safetensors, transformers, tokenizers
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from llamagen import Gpt, GptArgs, VqArgs  # noqa: E402
from make_fixtures import OUT, generate, randomise, rounded, write_model_dir  # noqa: E402

T = 12  # caption length (LlamaGen: 120)
SENTENCES = [
    "a red apple on a wooden table",
    "a cat sleeping on a sofa",
    "two dogs playing in the snow",
    "a big tree near the house",
    "a photo of a blue car on the street",
    "an orange sun over the sea",
    "a green apple and a yellow banana",
    "a small house under the stars",
]
CAPTIONS = [
    "a red apple on a wooden table",
    "A Cat",
    "two dogs playing in the snow under a big tree near the house at night",
]


def build_tokenizer():
    """A Unigram model over the words of SENTENCES (as "▁word" pieces) and their single
    characters, so that known words are one token and other text falls back to characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = sorted({w for s in SENTENCES for w in s.split()})
    chars = sorted({c for s in SENTENCES for c in s if c != " "})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(words)]
    vocab += [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def main():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4321)
    tok = build_tokenizer()

    # --- the text encoder ---------------------------------------------------------------
    t5_cfg = T5Config(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    t5 = T5EncoderModel(t5_cfg).eval()
    with torch.no_grad():
        for p in t5.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        for name, p in t5.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))

    # --- the GPT --------------------------------------------------------------------------
    ga = GptArgs(dim=64, n_layer=2, n_head=4, vocab_size=96, num_classes=0, cls_token_num=T,
                 caption_dim=t5_cfg.d_model, grid_h=4, grid_w=9, multiple_of=32)
    gpt = Gpt(ga).eval()
    randomise(gpt, gen, 0.25)
    gpt.cls_embedding.uncond_embedding.copy_(
        (torch.randn(T, t5_cfg.d_model, generator=gen) / t5_cfg.d_model**0.5).half().float()
    )
    va = VqArgs(codebook_size=96, codebook_embed_dim=8, z_channels=32, ch=32, ch_mult=[1, 1], num_res_blocks=0)
    d = write_model_dir("tiny_t2i_text", ga, va, gpt, "../tiny/vq.safetensors", "llamagen-t2i")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_encoder"] = "t5"
    cfg["defaults"] = {"cfg": 3.0, "window": 3}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    t5_dir = os.path.join(d, "t5")
    t5.save_pretrained(t5_dir, safe_serialization=True, max_shard_size="20KB")
    tok.save(os.path.join(t5_dir, "tokenizer.json"))
    assert os.path.exists(os.path.join(t5_dir, "model.safetensors.index.json")), "expected shards"

    # --- references ---------------------------------------------------------------------
    captions = []
    for ci, text in enumerate(CAPTIONS):
        enc = tok.encode(text.lower().strip())
        ids = enc.ids[: T - 1] + [1] if len(enc.ids) > T else enc.ids  # truncation keeps </s>
        n = len(ids)
        padded = torch.tensor([ids + [0] * (T - n)])
        mask = torch.tensor([[1] * n + [0] * (T - n)])
        with torch.no_grad():
            hidden = t5(input_ids=padded, attention_mask=mask).last_hidden_state[0]  # [T, C]
        # the sampler's left padding: rotate the padded rows to the front, zero them
        cond = torch.cat([hidden[n:], hidden[:n]])[None] * torch.flip(mask, [-1])[0, :, None]
        valid = torch.zeros(T, dtype=torch.bool)
        valid[T - n :] = True

        def masked_setup(batch, _orig=Gpt.setup_cache.__get__(gpt)):
            _orig(batch)
            slots = gpt.causal.shape[0]
            ok = torch.ones(slots, dtype=torch.bool)
            ok[:T] = valid
            gpt.causal = gpt.causal & (ok[None, :] | torch.eye(slots, dtype=torch.bool))

        gpt.setup_cache = masked_setup
        entry = {
            "text": text,
            "ids": ids,
            "hidden": rounded(hidden[:n]),
        }
        if ci == 0:
            hw = ga.grid_h * ga.grid_w
            tokens = torch.randint(0, ga.vocab_size, (hw,), generator=gen)
            both = torch.cat([cond, gpt.null_condition(cond)])
            slots = T + hw - 1
            causal = torch.tril(torch.ones(slots, slots, dtype=torch.bool))
            ok = torch.ones(slots, dtype=torch.bool)
            ok[:T] = valid
            m = (causal & (ok[None, :] | torch.eye(slots, dtype=torch.bool)))[None, None].expand(2, 1, -1, -1)
            with torch.no_grad():
                tf = gpt(both, tokens[None, :-1].expand(2, -1), mask=m)
            entry["teacher_forced"] = {
                "tokens": tokens.tolist(),
                "cond_logits": rounded(tf[0]),
                "uncond_logits": rounded(tf[1]),
            }
        runs = []
        for scale in (1.0, 3.0):
            for window in (None, 2, 3, 8):
                toks, passes = generate(gpt, cond, scale, window)
                runs.append({"cfg": scale, "mode": "ntp" if window is None else "zipar",
                             "window": window or ga.grid_w, "passes": passes, "tokens": toks})
        entry["greedy"] = runs
        del gpt.setup_cache
        captions.append(entry)
        print(f"caption {ci}: {n} tokens, runs: " + ", ".join(f"{r['mode']}-{r['window']}/{r['cfg']}: {r['passes']}" for r in runs))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"caption_tokens": T, "captions": captions}, f)
    print("wrote", d)


if __name__ == "__main__":
    main()
