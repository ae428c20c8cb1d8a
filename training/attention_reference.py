"""Reference attention probabilities of the shipped built-in model, from the PyTorch reference
(llamagen.py) on the exact f16 weights in assets/models/emoji: the prefill, a 1-input pass and
a 3-input ZipAR-like pass, class 723 with CFG (conditional half), mean over heads per layer and
every head of layer 2. tests/locality.rs requires the Rust capture to match within 1e-4.

    python training/attention_reference.py     # -> tests/fixtures/builtin_attention.json
"""

import json
import os

import torch

from builtin_reference import load_builtin
from llamagen import Gpt

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "builtin_attention.json")
HEAD_LAYER = 2
# (tokens, image positions) of each pass after the prefill
PASSES = [([17], [0]), ([5, 9, 11], [1, 2, 17])]


def record(model: Gpt, n_slots: int):
    """Conditional half, slots 0..n_slots: mean over heads per layer, heads of HEAD_LAYER."""
    probs = [layer.attention.last_probs[0, :, :, :n_slots] for layer in model.layers]
    return {
        "mean": [p.mean(0).tolist() for p in probs],
        "heads": probs[HEAD_LAYER].tolist(),
    }


def main():
    torch.set_num_threads(2)
    model, cfg = load_builtin()
    for layer in model.layers:
        layer.attention.record = True
    t = model.args.cls_token_num
    label = 723
    out = {"class": label, "cfg": True, "head_layer": HEAD_LAYER, "cond_len": t, "passes": []}
    with torch.no_grad():
        model.setup_cache(2)
        model.prefill(torch.tensor([label, cfg["num_classes"]]))
        out["passes"].append({"tokens": [], "positions": [], **record(model, t)})
        for tokens, positions in PASSES:
            model.feed(tokens, positions, 2)
            n = max(positions) + t + 1
            out["passes"].append({"tokens": tokens, "positions": positions, **record(model, n)})
        model.drop_cache()
    with open(OUT, "w") as f:
        json.dump(out, f)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
