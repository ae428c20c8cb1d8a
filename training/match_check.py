"""How close the Rust app's images come to the emoji they were asked for: runs
`zipar-studio generate` for 16 prompts per decoding mode and compares each image with the
training image of its class (token agreement with the VQ codes, and pixel PSNR).

    python training/match_check.py --bin target/release/zipar-studio [--model DIR] \
        [--modes ntp,zipar:4,zipar:2,adaptive:2] [--seeds 0,1] [-- extra generate flags]

Needs the data of prepare_data.py and the codes cached by train_gpt.py (runs/gpt/codes.pt).
"""

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np
import torch
from PIL import Image

from sample_check import PROMPTS, find_class

HERE = os.path.dirname(os.path.abspath(__file__))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-9)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "target", "release", "zipar-studio"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--modes", default="ntp,zipar:4,zipar:2,adaptive:2")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("extra", nargs="*", help="more generate flags, after --")
    args = ap.parse_args()
    classes = json.load(open(os.path.join(HERE, "data", "classes.json")))
    images = np.load(os.path.join(HERE, "data", "images.npy"))
    codes = torch.load(os.path.join(HERE, "runs", "gpt", "codes.pt")).numpy()
    ids = [find_class(classes, p) for p in PROMPTS]
    tmp = tempfile.mkdtemp()
    print(f"{'mode':12s} {'token-match':>11s} {'PSNR(dB)':>9s}  (mean over {len(ids)} prompts"
          f" x {len(args.seeds.split(','))} seeds; flags: {' '.join(args.extra) or 'model defaults'})")
    for mode in args.modes.split(","):
        name, _, window = mode.partition(":")
        match, quality = [], []
        for cid in ids:
            for seed in args.seeds.split(","):
                png, trace = os.path.join(tmp, "a.png"), os.path.join(tmp, "t.json")
                cmd = [args.bin, "generate", "--class", str(cid), "--mode", name, "--seed", seed,
                       "--quiet", "--out", png, "--trace", trace, *args.extra]
                if window:
                    cmd += ["--window", window]
                if args.model:
                    cmd += ["--model", args.model]
                subprocess.run(cmd, check=True, capture_output=True)
                toks = np.array(json.load(open(trace))["tokens"])
                match.append(float(np.mean(toks == codes[cid])))
                quality.append(psnr(np.array(Image.open(png).convert("RGB")), images[cid]))
        print(f"{mode:12s} {np.mean(match):11.3f} {np.mean(quality):9.2f}")


if __name__ == "__main__":
    main()
