"""Writes tests/fixtures/tiny*: small random LlamaGen-layout weights and reference outputs
computed by the PyTorch networks in llamagen.py, for the Rust parity tests.

The ZipAR reference below re-implements the official LlamaGen schedule step by step (see
shared/notes/zipar-official-schedule.md) on top of the slot-indexed cache, independently of
the Rust schedule code.

    python training/make_fixtures.py          # from the repository root; needs torch, safetensors
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from llamagen import Gpt, GptArgs, VqArgs, VqModel, to_uint8  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "tests", "fixtures")


def randomise(module: torch.nn.Module, gen: torch.Generator, std: float):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
            # stored as f16 to keep the fixtures small: round now so the reference uses
            # exactly the weights the Rust side reads
            p.copy_(p.half().float())


def cfg_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    if logits.shape[0] == 1:
        return logits[0]
    c, u = logits[0], logits[1]
    return u + (c - u) * scale


@torch.no_grad()
def generate(model: Gpt, label: int, scale: float, window, mask_unwritten=False):
    """Greedy decoding; window None = NTP, else the official ZipAR schedule. label: a class id,
    or a caption condition [1, T, C]."""
    a = model.args
    h, w = a.grid_h, a.grid_w
    batch = 2 if scale != 1.0 else 1
    cond = label if torch.is_tensor(label) else torch.tensor([label])  # a class, or caption rows
    if batch == 2:
        cond = torch.cat([cond, model.null_condition(cond)])
    model.setup_cache(batch)
    G = [[None] * w for _ in range(h)]
    pick = lambda lg: int(torch.argmax(cfg_logits(lg, scale)))  # noqa: E731
    G[0][0] = pick(model.prefill(cond, mask_unwritten))
    passes = 1
    if window is None or window >= w:
        prev = (0, 0)
        for i in range(1, h * w):
            r, c = divmod(i, w)
            lg = model.feed([G[prev[0]][prev[1]]], [prev[0] * w + prev[1]], batch, mask_unwritten)
            G[r][c] = pick(lg[:, 0])
            prev = (r, c)
            passes += 1
        model.drop_cache()
        return [t for row in G for t in row], passes
    s = window
    for c in range(1, w):
        lg = model.feed([G[0][c - 1]], [c - 1], batch, mask_unwritten)
        G[0][c] = pick(lg[:, 0])
        passes += 1
    n = [0] * h
    n[0] = w
    active = [1]
    aux = {1: G[0][w - 1]}
    corr = None
    while active:
        toks, pos, outs = [], [], []
        if corr is not None:
            toks.append(G[corr][w - 1])
            pos.append(corr * w + w - 1)
            outs.append(None)
            corr = None
        for r in active:
            if n[r] == 0:
                toks.append(aux[r])
                pos.append((r - 1) * w + w - 1)
            else:
                toks.append(G[r][n[r] - 1])
                pos.append(r * w + n[r] - 1)
            outs.append(r)
        lg = model.feed(toks, pos, batch, mask_unwritten)
        passes += 1
        start = list(active)
        for i, r in enumerate(outs):
            if r is None:
                continue
            G[r][n[r]] = pick(lg[:, i])
        for r in start:
            n[r] += 1
            if n[r] == s and r < h - 1 and (r + 1) not in active:
                aux[r + 1] = G[r - 1][n[r - 1] - 1]
                active.append(r + 1)
            if n[r] == w:
                corr = r
                active.remove(r)
    model.drop_cache()
    return [t for row in G for t in row], passes


def state_dict_f16(m):
    return {k: v.detach().half().contiguous() for k, v in m.state_dict().items()}


def write_model_dir(name, gpt_args: GptArgs, vq_args: VqArgs, gpt: Gpt, vq, kind):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    gsd = state_dict_f16(gpt)
    gsd = {k: v for k, v in gsd.items() if k != "rope"}
    save_file(gsd, os.path.join(d, "gpt.safetensors"))
    vq_file = "vq.safetensors"
    if isinstance(vq, str):
        vq_file = vq  # share another directory's VQ weights
    else:
        keep = ("quantize.", "post_quant_conv", "decoder.")
        vsd = {k: v for k, v in state_dict_f16(vq).items() if k.startswith(keep)}
        save_file(vsd, os.path.join(d, vq_file))
        # the same weights as original-style pickles: DDP layout (under "model") and FSDP (top)
        torch.save({"model": gsd}, os.path.join(d, "gpt.pt"))
        torch.save(vsd, os.path.join(d, "vq.pt"))
    cfg = {
        "kind": kind,
        "name": name,
        "gpt_weights": "gpt.safetensors",
        "vq_weights": vq_file,
        "grid_h": gpt_args.grid_h,
        "grid_w": gpt_args.grid_w,
        "dim": gpt_args.dim,
        "n_layer": gpt_args.n_layer,
        "n_head": gpt_args.n_head,
        "vocab_size": gpt_args.vocab_size,
        "num_classes": gpt_args.num_classes,
        "cls_token_num": gpt_args.cls_token_num,
        "multiple_of": gpt_args.multiple_of,
        "vq": {
            "codebook_size": vq_args.codebook_size,
            "codebook_embed_dim": vq_args.codebook_embed_dim,
            "z_channels": vq_args.z_channels,
            "ch": vq_args.ch,
            "ch_mult": vq_args.ch_mult,
            "num_res_blocks": vq_args.num_res_blocks,
            "norm_groups": vq_args.norm_groups,
        },
    }
    if gpt_args.caption_dim is not None:
        cfg["caption_dim"] = gpt_args.caption_dim
    else:
        names = ["red apple", "green apple", "cat", "dog", "sun", "moon", "star", "tree", "house", "car"]
        classes = [
            {"id": i, "name": n, "short_names": [n.replace(" ", "_")], "keywords": []}
            for i, n in enumerate(names[: gpt_args.num_classes])
        ]
        with open(os.path.join(d, "classes.json"), "w") as f:
            json.dump(classes, f)
        cfg["classes"] = "classes.json"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return d


def rounded(t: torch.Tensor):
    return [round(float(x), 6) for x in t.flatten()]


@torch.no_grad()
def write_non_tensor_pt():
    """A .pt whose state dict holds a number where a tensor should be (the error-path test)."""
    sd = {"norm.weight": torch.ones(4), "layers.0.attention.wo.weight": 3}
    torch.save({"model": sd, "steps": 10}, os.path.join(OUT, "non_tensor.pt"))


def main():
    write_non_tensor_pt()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    # h != w catches transposed row/column handling
    ga = GptArgs(dim=64, n_layer=2, n_head=4, vocab_size=96, num_classes=10, grid_h=5, grid_w=6,
                 multiple_of=32)
    va = VqArgs(codebook_size=96, codebook_embed_dim=8, z_channels=32, ch=32, ch_mult=[1, 1], num_res_blocks=0)
    gpt = Gpt(ga).eval()
    randomise(gpt, gen, 0.25)
    vq = VqModel(va).eval()
    randomise(vq, gen, 0.15)
    d = write_model_dir("tiny", ga, va, gpt, vq, "llamagen-c2i")

    hw = ga.grid_h * ga.grid_w
    tokens = torch.randint(0, ga.vocab_size, (hw,), generator=gen)
    label = 3
    cond = torch.tensor([label, ga.num_classes])
    tf = gpt(cond, tokens[None, :-1].expand(2, -1))  # [2, hw, vocab]
    runs = []
    for scale in (1.0, 3.0):
        for window in (None, 2, 3, 4, 5, 6):
            for mask in (False, True) if window in (None, 3) else (False,):
                toks, passes = generate(gpt, label, scale, window, mask)
                runs.append(
                    {
                        "class": label,
                        "cfg": scale,
                        "mode": "ntp" if window is None else "zipar",
                        "window": window or ga.grid_w,
                        "mask_unwritten": mask,
                        "passes": passes,
                        "tokens": toks,
                    }
                )
    # one pass at a position whose predecessors were never written, with and without masking
    masked = {}
    for mask in (False, True):
        gpt.setup_cache(1)
        gpt.prefill(torch.tensor([2]), mask)
        masked[str(mask).lower()] = rounded(gpt.feed([7], [5], 1, mask)[0, 0])
        gpt.drop_cache()
    codes = torch.randint(0, va.codebook_size, (1, ga.grid_h, ga.grid_w), generator=gen)
    img = vq.decode_code(codes)[0]
    ref = {
        "teacher_forced": {
            "class": label,
            "tokens": tokens.tolist(),
            "cond_logits": rounded(tf[0]),
            "uncond_logits": rounded(tf[1]),
        },
        "greedy": runs,
        "unwritten_step": masked,
        "vq": {
            "codes": codes.flatten().tolist(),
            "shape": list(img.shape),
            "pixels": rounded(img),
            "rgb8": to_uint8(img).permute(1, 2, 0).flatten().tolist(),
        },
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)

    # text-conditional: a short caption condition (T = 4 slots with zeroed RoPE)
    ta = GptArgs(dim=64, n_layer=2, n_head=4, vocab_size=96, num_classes=0, cls_token_num=4,
                 caption_dim=12, grid_h=4, grid_w=4, multiple_of=32)
    tgpt = Gpt(ta).eval()
    randomise(tgpt, gen, 0.25)
    tgpt.cls_embedding.uncond_embedding.copy_((torch.randn(4, 12, generator=gen) / 12**0.5).half().float())
    td = write_model_dir("tiny_t2i", ta, va, tgpt, "../tiny/vq.safetensors", "llamagen-t2i")
    caption = torch.randn(1, 4, 12, generator=gen).half().float()
    ttoks = torch.randint(0, ta.vocab_size, (ta.grid_h * ta.grid_w,), generator=gen)
    both = torch.cat([caption, tgpt.null_condition(caption)])
    ttf = tgpt(both, ttoks[None, :-1].expand(2, -1))
    with open(os.path.join(td, "reference.json"), "w") as f:
        json.dump(
            {
                "caption": rounded(caption[0]),
                "tokens": ttoks.tolist(),
                "cond_logits": rounded(ttf[0]),
                "uncond_logits": rounded(ttf[1]),
            },
            f,
        )
    print("wrote", d, "and", td)
    for r in runs:
        print(r["mode"], r["window"], "cfg", r["cfg"], "mask", r["mask_unwritten"], "passes", r["passes"])


if __name__ == "__main__":
    main()
