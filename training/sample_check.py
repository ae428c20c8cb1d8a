"""Free-running check of the GPT during training: decodes a few classes from the class token
alone (as the app does) and reports how many tokens match the training image's codes, plus a
PNG strip (top: generated, bottom: the training image through the VQ).

    python training/sample_check.py [--gpt runs/gpt/last.pt] [--cfg 3] [--temperature 0]
"""

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

from llamagen import Gpt, VqModel, to_uint8
from train_gpt import gpt_args
from train_vq import VQ_ARGS

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["red apple", "grinning face", "cat face", "dog face", "sun", "rocket", "pizza",
           "heart", "tree", "house", "car", "star", "fire", "ghost", "banana", "rainbow"]


def find_class(classes, prompt):
    words = prompt.split()
    for c in classes:
        if c["name"].lower() == prompt or prompt.replace(" ", "_") in c["short_names"]:
            return c["id"]
    best = max(classes, key=lambda c: sum(w in c["name"].lower().split() for w in words))
    return best["id"]


@torch.no_grad()
def sample(model, labels, cfg, temperature, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    b = len(labels)
    cond = torch.cat([labels, model.null_condition(labels)])
    toks = torch.zeros(b, 0, dtype=torch.long)
    n = model.args.grid_h * model.args.grid_w
    for i in range(n):
        logits = model(cond, torch.cat([toks, toks]))[:, -1]
        c, u = logits[:b], logits[b:]
        lg = u + (c - u) * cfg
        if temperature == 0:
            nxt = lg.argmax(-1)
        else:
            lg = lg / temperature
            if top_k:
                kth = lg.topk(top_k, dim=-1).values[:, -1:]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            nxt = torch.multinomial(lg.softmax(-1), 1, generator=g)[:, 0]
        toks = torch.cat([toks, nxt[:, None]], dim=1)
    return toks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpt", default=os.path.join(HERE, "runs", "gpt", "last.pt"))
    ap.add_argument("--vq", default=os.path.join(HERE, "runs", "vq", "last.pt"))
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sample_check.png")
    args = ap.parse_args()
    torch.set_num_threads(2)
    classes = json.load(open(os.path.join(HERE, "data", "classes.json")))
    codes = torch.load(os.path.join(HERE, "runs", "gpt", "codes.pt"))
    model = Gpt(gpt_args(len(classes))).eval()
    model.load_state_dict(torch.load(args.gpt, map_location="cpu")["model"])
    vq = VqModel(VQ_ARGS).eval()
    vq.load_state_dict(torch.load(args.vq, map_location="cpu")["model"])
    labels = torch.tensor([find_class(classes, p) for p in PROMPTS])
    toks = sample(model, labels, args.cfg, args.temperature, args.top_k, args.seed)
    ref = codes[labels]
    match = (toks == ref).float().mean(1)
    first = [(row != r).nonzero()[0].item() if (row != r).any() else 256 for row, r in zip(toks, ref)]
    for p, m, f in zip(PROMPTS, match.tolist(), first):
        print(f"{p:15s} match {m:.2f} first miss at {f}")
    print(f"mean match {match.mean():.3f}")
    with torch.no_grad():
        gen = to_uint8(vq.decode_code(toks.view(-1, 16, 16)))
        rec = to_uint8(vq.decode_code(ref.view(-1, 16, 16)))
    row = lambda t: np.concatenate(list(t.permute(0, 2, 3, 1).numpy()), axis=1)
    Image.fromarray(np.concatenate([row(gen), row(rec)], axis=0)).save(args.out)


if __name__ == "__main__":
    main()
