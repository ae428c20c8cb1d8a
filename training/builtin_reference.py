"""Reference greedy tokens of the shipped built-in model, computed by the PyTorch reference
(llamagen.py + the official ZipAR schedule of make_fixtures.py) from the exact f16 weights in
assets/models/emoji. tests/builtin_model.rs requires the Rust decoder to reproduce them.

    python training/builtin_reference.py     # -> tests/fixtures/builtin_greedy.json
"""

import json
import os

import torch
from safetensors.torch import load_file

from llamagen import Gpt
from make_fixtures import generate
from train_gpt import gpt_args

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "assets", "models", "emoji")
OUT = os.path.join(HERE, "..", "tests", "fixtures", "builtin_greedy.json")
# (class, cfg scale, window or None for NTP, mask unwritten slots)
CASES = [(723, 1.0, None, False), (723, 1.0, 4, True), (567, 2.0, 4, False), (567, 1.0, 2, True)]


def load_builtin():
    """The shipped GPT in the PyTorch reference (f16 weights as f32) and its config."""
    cfg = json.load(open(os.path.join(ASSETS, "config.json")))
    model = Gpt(gpt_args(cfg["num_classes"])).eval()
    sd = {k: v.float() for k, v in load_file(os.path.join(ASSETS, "gpt.safetensors")).items()}
    model.load_state_dict(sd)
    return model, cfg


def main():
    torch.set_num_threads(2)
    model, cfg = load_builtin()
    out = []
    for label, scale, window, mask in CASES:
        tokens, passes = generate(model, label, scale, window, mask_unwritten=mask)
        out.append({"class": label, "cfg": scale, "window": window, "mask_unwritten": mask,
                    "passes": passes, "tokens": tokens})
        print(label, scale, window, mask, passes)
    with open(OUT, "w") as f:
        json.dump({"gpt_steps": cfg["training"]["gpt_steps"], "cases": out}, f)


if __name__ == "__main__":
    main()
