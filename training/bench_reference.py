"""The speed of the product against this project's PyTorch reference, in one run, on the same
weights and settings: greedy decoding (the reference samples greedily), NTP and ZipAR windows,
per image, after one warm-up each. The Rust side is `zipar-studio bench --greedy` on the same
model, classes and windows, run from this script right after the PyTorch timings.

    python training/bench_reference.py --bin target/release/zipar-studio          # built-in
    python training/bench_reference.py --bin ... --cfg 3 --windows 2,4,8 --classes 723,0
    python training/bench_reference.py --bin ... --random-b /tmp/llamagen-b --cfg 2 --windows 8
        # a LlamaGen-B-sized model (111M, VQ-16 decoder) with random weights, 256 px, and
        # the VQ decoder's time for one image in both

Needs torch; quiet machine (no training or build running); a release binary.
"""

import argparse
import json
import os
import subprocess
import time

import torch
from safetensors.torch import load_file

from llamagen import Gpt, GptArgs, VqArgs, VqModel
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


def write_random_b(d: str):
    """A LlamaGen-B-sized c2i model (GPT-B, VQ-16, 16 x 16 tokens, 256 px) with random
    weights (PyTorch's default init), stored as f32 safetensors with LlamaGen's key names."""
    from safetensors.torch import save_file

    os.makedirs(d, exist_ok=True)
    if os.path.exists(os.path.join(d, "config.json")):
        return
    torch.manual_seed(0)
    ga = GptArgs(dim=768, n_layer=12, n_head=12, vocab_size=16384, num_classes=1000)
    va = VqArgs(codebook_size=16384, codebook_embed_dim=8, z_channels=256, ch=128,
                ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, norm_groups=32)
    gpt = {k: v.contiguous() for k, v in Gpt(ga).state_dict().items() if k != "rope"}
    keep = ("quantize.", "post_quant_conv", "decoder.")
    vq = {k: v.contiguous() for k, v in VqModel(va).state_dict().items() if k.startswith(keep)}
    save_file(gpt, os.path.join(d, "gpt.safetensors"))
    save_file(vq, os.path.join(d, "vq.safetensors"))
    cfg = {"kind": "llamagen-c2i", "name": "random LlamaGen-B", "gpt_weights": "gpt.safetensors",
           "vq_weights": "vq.safetensors", "grid_h": 16, "grid_w": 16, "dim": 768, "n_layer": 12,
           "n_head": 12, "vocab_size": 16384, "num_classes": 1000,
           "vq": {"codebook_size": 16384, "codebook_embed_dim": 8, "z_channels": 256, "ch": 128,
                  "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "norm_groups": 32},
           "defaults": {"cfg": 2.0}}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=1)


def vq_decode_ms(model_dir: str) -> float:
    """PyTorch's time to decode one 16 x 16 grid of random codes (after a warm-up)."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    v = cfg["vq"]
    va = VqArgs(codebook_size=v["codebook_size"], codebook_embed_dim=v["codebook_embed_dim"],
                z_channels=v["z_channels"], ch=v["ch"], ch_mult=v["ch_mult"],
                num_res_blocks=v["num_res_blocks"], norm_groups=v["norm_groups"])
    vq = VqModel(va).eval()
    vq.load_state_dict(load_file(os.path.join(model_dir, cfg["vq_weights"])), strict=False)
    codes = torch.randint(0, v["codebook_size"], (1, cfg["grid_h"], cfg["grid_w"]))
    with torch.no_grad():
        vq.decode_code(codes)
        t0 = time.perf_counter()
        vq.decode_code(codes)
    return (time.perf_counter() - t0) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="zipar-studio release binary")
    ap.add_argument("--model", default=BUILTIN)
    ap.add_argument("--classes", default="723,0")
    ap.add_argument("--windows", default="2,4,8")
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-b", help="build (once) and time a random LlamaGen-B-sized model in this folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.random_b:
        write_random_b(args.random_b)
        args.model = args.random_b
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
    torch_vq = vq_decode_ms(args.model)
    line = subprocess.run(
        [args.bin, "generate", "--model", args.model, "--class", str(classes[0]), "--mode", "ntp",
         "--greedy", "--cfg", str(args.cfg), "--quiet", "--out", "/tmp/zipar-bench-ref.png"],
        check=True, capture_output=True, text=True,
    ).stdout
    rust_vq = float(line.split(" ms image")[0].split("+ ")[-1])
    print(f"greedy, cfg {args.cfg}, classes {classes}, torch {torch.__version__} with {args.threads} threads")
    print(f"VQ decode of one image: pytorch {torch_vq:.1f} ms, rust {rust_vq:.1f} ms")
    print("mode     window  pytorch-ms  rust-ms  rust-speed-up")
    for s in windows:
        key = ("ntp", w) if s is None else ("zipar", s)
        r = rust.get(key, float("nan"))
        print(f"{key[0]:<8} {key[1]:>6}  {torch_ms[s]:>10.1f}  {r:>7.1f}  {torch_ms[s] / r:>12.2f}x")


if __name__ == "__main__":
    main()
