"""The speed of the product against this project's PyTorch reference, in one run, on the same
weights and settings: greedy decoding (the reference samples greedily), NTP and ZipAR windows,
per image, after one warm-up each. The Rust side is `zipar-studio bench --greedy` on the same
model, classes and windows, run from this script right after the PyTorch timings.

    python training/bench_reference.py --bin target/release/zipar-studio          # built-in
    python training/bench_reference.py --bin ... --cfg 3 --windows 2,4,8 --classes 723,0

Needs torch; quiet machine (no training or build running); a release binary.
"""

import argparse
import json
import os
import subprocess
import time

import torch
from safetensors.torch import load_file

from llamagen import Gpt, GptArgs
from make_fixtures import generate

HERE = os.path.dirname(os.path.abspath(__file__))
BUILTIN = os.path.join(HERE, "..", "assets", "models", "emoji")


def load(model_dir: str) -> Gpt:
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    args = GptArgs(dim=cfg["dim"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                   vocab_size=cfg["vocab_size"], num_classes=cfg["num_classes"],
                   grid_h=cfg["grid_h"], grid_w=cfg["grid_w"])
    model = Gpt(args).eval()
    sd = load_file(os.path.join(model_dir, cfg["gpt_weights"]))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="zipar-studio release binary")
    ap.add_argument("--model", default=BUILTIN)
    ap.add_argument("--classes", default="723,0")
    ap.add_argument("--windows", default="2,4,8")
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    classes = [int(c) for c in args.classes.split(",")]
    windows = [None] + [int(s) for s in args.windows.split(",")]
    torch_ms = {}
    with torch.no_grad():
        for s in windows:
            generate(model, classes[0], args.cfg, s)  # warm-up
            times = []
            for c in classes:
                t0 = time.perf_counter()
                generate(model, c, args.cfg, s)
                times.append((time.perf_counter() - t0) * 1e3)
            torch_ms[s] = sorted(times)[len(times) // 2]
    out = subprocess.run(
        [args.bin, "bench", "--model", args.model, "--class", args.classes, "--windows", args.windows,
         "--adaptive", "--seeds", "0", "--greedy", "--cfg", str(args.cfg), "--json", "/tmp/zipar-bench-ref.json"],
        check=True, capture_output=True, text=True,
    ).stdout
    print(out)
    rust = {(r["setting"]["mode"], r["setting"]["window"]): r["median_ms"]
            for r in json.load(open("/tmp/zipar-bench-ref.json"))}
    w = model.args.grid_w
    print(f"greedy, cfg {args.cfg}, classes {classes}, torch {torch.__version__} with {args.threads} threads")
    print("mode     window  pytorch-ms  rust-ms  rust-speed-up")
    for s in windows:
        key = ("ntp", w) if s is None else ("zipar", s)
        r = rust.get(key, float("nan"))
        print(f"{key[0]:<8} {key[1]:>6}  {torch_ms[s]:>10.1f}  {r:>7.1f}  {torch_ms[s] / r:>12.2f}x")


if __name__ == "__main__":
    main()
