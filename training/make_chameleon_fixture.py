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
# Lumina-mGPT's special tokens (data/item_processor.py, data/convertsation.py): image start,
# image end, end of a conversation turn, end of row, and the grid-size tokens
# <reserved{8800 + n}> for n 32-pixel patches.
SPECIAL = ["<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08799>", "<reserved08801>",
           "<reserved08802>"]
WORDS = ["Generate", "an", "image", "of", "according", "to", "the", "following", "prompt", "a",
         "red", "apple", "cat", "64x64"]


def randomise_hf(model, seed: int):
    """Random weights that make a tiny model's logits spread: norm scales near 1, norm shifts
    and everything else Gaussian (transformers' own init is too flat to tell code paths apart)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def tiny_chameleon(vocab, kv_heads: int, seed: int):
    """A 2-layer Chameleon of width 48 with 4 query heads over `vocab`, randomised."""
    cfg = ChameleonConfig(
        vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, vocabulary_map=vocab,
        vq_config={"embed_dim": 4, "num_embeddings": IMAGE_CODES, "latent_channels": 4,
                   "resolution": 16, "in_channels": 3, "base_channels": 32,
                   "channel_multiplier": [1, 2], "num_res_blocks": 1, "attn_resolutions": []},
    )
    model = ChameleonForConditionalGeneration(cfg).eval()
    randomise_hf(model, seed)
    return model


def image_token_name(code: int) -> str:
    """Chameleon's BPE name of VQ code `code`: IMGIMG, its decimal digits as letters A-J, Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def main():
    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    for i, name in enumerate(SPECIAL + WORDS, start=4):
        vocab[name] = i
    assert len(vocab) == 24
    # shuffled, as in the real vocabulary: the BPE order is not the code order
    order = torch.randperm(IMAGE_CODES, generator=torch.Generator().manual_seed(7)).tolist()
    for bpe, code in enumerate(order, start=24):
        vocab[image_token_name(code)] = bpe
    model = tiny_chameleon(vocab, kv_heads=4, seed=11)
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




# --- ZipAR on the end-of-row layout (Lumina-mGPT), greedy, CFG 1 ---------------------------
#
# The official Lumina-mGPT ZipAR keeps a KV cache of the entries written so far and lets each
# query see the entries at positions up to its own: the K/V of an entry are those computed when
# it was fed. `CachedChameleon` does that with the modules of the transformers model (checked
# against the model's own full forward on plain next-token decoding below).


class CachedChameleon:
    """Also serves Llama-style decoders (Emu3's text model): no query/key norms, grouped-query
    attention, the rotary embedding on the model instead of each attention module."""

    def __init__(self, model, text_model=None, rope=None):
        self.m = text_model if text_model is not None else model.model
        self.lm_head = model.lm_head
        self.rope = rope
        self.cache = [dict() for _ in self.m.layers]  # per layer: position -> (k [Hkv, D], v [Hkv, D])

    @torch.no_grad()
    def feed(self, tokens, positions):
        """Feeds entries (token ids at global positions) in one pass: every K/V written first,
        then each query attends to the cached entries at positions <= its own. Returns the
        logits of each input."""
        from transformers.models.chameleon.modeling_chameleon import apply_rotary_pos_emb

        x = self.m.embed_tokens(torch.tensor(tokens))
        k_in = len(tokens)
        pos = torch.tensor([positions])
        for layer, cache in zip(self.m.layers, self.cache):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            hd = a.head_dim
            nh = a.q_proj.out_features // hd
            nkv = a.k_proj.out_features // hd
            q = a.q_proj(h).reshape(k_in, nh, hd)
            k = a.k_proj(h).reshape(k_in, nkv, hd)
            if hasattr(a, "q_norm"):
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = q.transpose(0, 1)[None], k.transpose(0, 1)[None]
            v = a.v_proj(h).reshape(k_in, nkv, hd).transpose(0, 1)[None]
            rope = self.rope if self.rope is not None else a.rotary_emb
            cos, sin = rope(v, pos)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            for i, p in enumerate(positions):
                cache[p] = (k[0, :, i], v[0, :, i])
            outs = []
            for i, p in enumerate(positions):
                seen = sorted(pp for pp in cache if pp <= p)
                keys = torch.stack([cache[pp][0] for pp in seen], dim=1)  # [Hkv, n, D]
                vals = torch.stack([cache[pp][1] for pp in seen], dim=1)
                keys = keys.repeat_interleave(nh // nkv, dim=0)
                vals = vals.repeat_interleave(nh // nkv, dim=0)
                att = torch.softmax((q[0, :, i : i + 1] @ keys.transpose(1, 2)) * a.scaling, dim=-1)
                outs.append((att @ vals).reshape(nh * hd))
            x = x + a.o_proj(torch.stack(outs))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.m.norm(x))


def zipar_end_of_row(h, w, s):
    """The passes of ZipAR on the end-of-row layout (s = w + 1: next-token prediction): each
    pass a list of feeds, ("prefill",), ("sep", r) for the separator that opens row r (the
    end-of-row token of row r - 1), or ("cell", r, c); each feed predicts the next image token
    of its row. Row r + 1 starts once row r's block holds s entries (its separator and s - 1
    image tokens). A row's last token is fed with the pass after it is drawn ("last": logits
    discarded), as the official code's `last_token_in_row_idx`."""
    n, active, passes, first, done = [0] * h, [0], [], True, None
    while active:
        if first:
            feeds, first = [("prefill",)], False
        else:
            # a row completed by the previous pass: its last token, logits discarded
            feeds = [("last", done, w - 1)] if done is not None else []
            done = None
            feeds += [("sep", r) if n[r] == 0 else ("cell", r, n[r] - 1) for r in active]
        passes.append((feeds, list(active)))
        for r in list(active):
            n[r] += 1
            if n[r] + 1 == s and r + 1 < h:
                active.append(r + 1)
            if n[r] == w:
                active.remove(r)
                done = r
    return passes


def unconditional_prompt(ids, image_start):
    """The official ZipAR code's unconditional prompt: token 0, then token 1 in place of every
    prompt token before the image start; the image start and grid tokens kept."""
    text = max((i for i, t in enumerate(ids) if t == image_start), default=len(ids))
    return [0 if i == 0 else 1 if i < text else t for i, t in enumerate(ids)]


def greedy_zipar(model, prompt, h, w, s, eol, img_bpe, cfg=1.0, uncond=None, cached=CachedChameleon,
                 log_softmax=False):
    """Greedy tokens (VQ codes, raster order) and pass count of ZipAR-s on an h x w grid; with
    cfg > 1, logits = u + (c - u) * cfg from a second cache fed the unconditional prompt, which
    may be of another length (Emu3's negative prompt: that cache holds the image entries after
    its own prompt, as transformers' unbatched guidance feeds them); `log_softmax` guides the
    log-probabilities instead of the logits, as Emu3's sampler does. `cached(model)` builds a
    cache."""
    t = len(prompt)
    cm = cached(model)
    um = cached(model) if cfg > 1.0 else None
    shift = len(uncond) - t if um is not None else 0
    bpe_to_code = {b: c for c, b in enumerate(img_bpe)}
    grid = [[None] * w for _ in range(h)]
    passes = zipar_end_of_row(h, w, s)
    for feeds, rows in passes:
        toks, poss = [], []
        for f in feeds:
            if f[0] == "prefill":
                toks += prompt
                poss += list(range(t))
            elif f[0] == "sep":
                toks.append(eol)
                poss.append(t + f[1] * (w + 1) - 1)
            else:
                toks.append(img_bpe[grid[f[1]][f[2]]])
                poss.append(t + f[1] * (w + 1) + f[2])
        logits = cm.feed(toks, poss)
        if um is not None:
            if feeds[0][0] == "prefill":
                utoks = list(uncond) + toks[t:]
                uposs = list(range(len(uncond))) + [p + shift for p in poss[t:]]
            else:
                utoks, uposs = toks, [p + shift for p in poss]
            u = um.feed(utoks, uposs)
            if feeds[0][0] == "prefill":  # the two prompts' last entries
                logits, u = logits[-1:], u[-1:]
            if log_softmax:
                logits, u = torch.log_softmax(logits, -1), torch.log_softmax(u, -1)
            logits = u + (logits - u) * cfg
        # the rows that wanted logits: the prefill's last entry, else every feed but a "last"
        if feeds[0][0] == "prefill":
            rows_logits = [logits[-1]]
        else:
            rows_logits = [row for f, row in zip(feeds, logits) if f[0] != "last"]
        for r, row in zip(rows, rows_logits):
            c = next(i for i in range(w) if grid[r][i] is None)
            grid[r][c] = bpe_to_code[img_bpe[int(row[img_bpe].argmax())]]
    return [code for row in grid for code in row], len(passes)


def write_tokenizer(d, vocab):
    """A word-level tokenizer over the fixture's vocabulary, with the special tokens matched
    whole and a BOS added in front, as Chameleon's tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = {k: v for k, v in vocab.items() if not k.startswith("IMGIMG")}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"] + SPECIAL)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(d, "tokenizer.json"))
    return tok


def lumina_prompt(tok, vocab, prompt, h, w, size):
    """Lumina-mGPT's generation prompt (generate_examples/generate.py, data/item_processor.py):
    the request as one conversation turn ending with <reserved08706>, then the image start and
    the grid-size tokens (<reserved{8800 + n}>, n = pixels / 32)."""
    text = f"Generate an image of {size}x{size} according to the following prompt:\n{prompt}<reserved08706>"
    ids = tok.encode(text).ids
    return ids + [vocab["<racm3:break>"], vocab[f"<reserved{8800 + h // 2:05d}>"],
                  vocab[f"<reserved{8800 + w // 2:05d}>"]]


def write_zipar_reference():
    d = os.path.join(OUT, "tiny_chameleon")
    model = ChameleonForConditionalGeneration.from_pretrained(d).eval()
    vocab = model.config.vocabulary_map
    img_bpe = [vocab[image_token_name(c)] for c in range(IMAGE_CODES)]
    eol = vocab["<reserved08799>"]
    prompt = [1, 6, 11, 19, 4]
    h, w = 3, 4
    runs = []
    for s in (w + 1, 2, 3, 4):
        codes, passes = greedy_zipar(model, prompt, h, w, s, eol, img_bpe)
        runs.append({"window": s, "codes": codes, "passes": passes})
    # the cached reference equals the model's own forward on next-token decoding
    seq = list(prompt)
    for i, code in enumerate(runs[0]["codes"]):
        seq.append(img_bpe[code])
        if i % w == w - 1:
            seq.append(eol)
    with torch.no_grad():
        full = model.lm_head(model.model(input_ids=torch.tensor([seq])).last_hidden_state)[0]
    cm = CachedChameleon(model)
    cached = cm.feed(seq, list(range(len(seq))))
    assert (full - cached).abs().max() < 1e-4, (full - cached).abs().max()
    # The folder as the app opens it: the tokenizer, the image decoder (the taming VQGAN fixture,
    # also 40 codes, 4x up-sampling) and zipar.json (image size and decoder configuration).
    import shutil

    tok = write_tokenizer(d, vocab)
    shutil.copy(os.path.join(OUT, "tiny_vqgan", "vqgan.safetensors"), os.path.join(d, "vqgan.safetensors"))
    vq = json.load(open(os.path.join(OUT, "tiny_vqgan", "reference.json")))["vq"]
    size, lh, lw = 64, 4, 4  # the fixture's "pixels" for the template; a 4 x 4 code grid
    with open(os.path.join(d, "zipar.json"), "w") as f:
        json.dump({"image_size": size, "grid": [lh, lw], "vq": vq}, f, indent=1)
    text_prompt = "a red apple"
    ids = lumina_prompt(tok, vocab, text_prompt, lh, lw, size)
    text_codes, text_passes = greedy_zipar(model, ids, lh, lw, 3, eol, img_bpe)
    ref = json.load(open(os.path.join(d, "reference.json")))
    ref["zipar"] = {"prompt": prompt, "grid": [h, w], "eol": eol, "runs": runs}
    uncond = unconditional_prompt(ids, vocab["<racm3:break>"])
    cfg_codes, cfg_passes = greedy_zipar(model, ids, lh, lw, 3, eol, img_bpe, cfg=3.0, uncond=uncond)
    ref["text"] = {"prompt": text_prompt, "ids": ids, "grid": [lh, lw], "window": 3,
                   "codes": text_codes, "passes": text_passes,
                   "cfg": {"scale": 3.0, "uncond": uncond, "codes": cfg_codes, "passes": cfg_passes}}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print("zipar runs:", [(r["window"], r["passes"]) for r in runs])


def write_gqa():
    """The same architecture with grouped-query attention (4 query heads, 2 key/value heads),
    language-model weights only: `tests/fixtures/tiny_chameleon_gqa`."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    vocab = json.load(open(os.path.join(OUT, "tiny_chameleon", "config.json")))["vocabulary_map"]
    model = tiny_chameleon(vocab, kv_heads=2, seed=12)
    cfg = model.config
    d = os.path.join(OUT, "tiny_chameleon_gqa")
    os.makedirs(d, exist_ok=True)
    cfg.save_pretrained(d)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "vqmodel" not in k}
    save_file(sd, os.path.join(d, "model.safetensors"))
    ids = torch.tensor([[1, 5, 9, 17, 3, 30, 44, 2, 60, 25, 41, 52]])
    with torch.no_grad():
        logits = model.lm_head(model.model(input_ids=ids).last_hidden_state)[0]
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"ids": ids[0].tolist(), "logits": [rounded(row) for row in logits]}, f)
    print("wrote", d)


if __name__ == "__main__":
    main()
    write_zipar_reference()
    write_gqa()
