"""Trains the scaled-down LlamaGen VQ tokenizer on the emoji images (64 px -> 16 x 16 codes).

    python training/train_vq.py --minutes 40          # resumable: run again to continue

Loss: L1 + MSE on pixels, codebook and commitment terms (no GAN / perceptual loss: their
pretrained networks are not available offline). The held-out split of prepare_data.py
(~5% of the (class, style) images) measures PSNR.
Checkpoints: training/runs/vq/last.pt (model, optimiser, step); log: training/runs/vq/log.csv.
"""

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from llamagen import VqArgs, VqModel
from prepare_data import augment

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "checkpoints", "vq.safetensors")
VQ_ARGS = VqArgs(
    codebook_size=1024, codebook_embed_dim=8, z_channels=64, ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, norm_groups=8
)


def load_images(device):
    """All styles; the fixed held-out split of prepare_data.py is never trained on."""
    arr = np.load(os.path.join(HERE, "data", "images.npy"))
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    held = torch.from_numpy(np.load(os.path.join(HERE, "data", "heldout.npy")))
    return x[~held].to(device), x[held].to(device)


def psnr(a, b):
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(1.0 / mse)).mean().item()


@torch.no_grad()
def evaluate(model, x, bs=64):
    model.eval()
    out, used = [], set()
    for i in range(0, len(x), bs):
        rec, codes, _, _ = model(x[i : i + bs])
        out.append(rec)
        used.update(codes.flatten().tolist())
    model.train()
    return psnr(torch.cat(out), x), len(used)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--augment", type=int, default=1, help="random shifts and scales (prepare_data.augment)")
    ap.add_argument("--out", default=os.path.join(HERE, "runs", "vq"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    train, held = load_images(device)
    torch.manual_seed(0)
    model = VqModel(VQ_ARGS).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    step = 0
    ckpt = os.path.join(args.out, "last.pt")
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        if "opt" in state:
            opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed at step {step}")
    elif os.path.exists(WEIGHTS):
        # weights-only checkpoint committed by export.py: fresh optimiser
        from safetensors import safe_open

        with safe_open(WEIGHTS, "pt") as f:
            model.load_state_dict({k: f.get_tensor(k).float() for k in f.keys()})
            step = int(f.metadata().get("step", 0))
        print(f"resumed weights only at step {step}")
    log = open(os.path.join(args.out, "log.csv"), "a")
    t0 = time.time()
    gen = torch.Generator(device="cpu").manual_seed(step)
    while step < args.steps and (time.time() - t0) < args.minutes * 60:
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        x = augment(train[idx], gen) if args.augment else train[idx]
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        rec, codes, vq_loss, commit = model(x)
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + vq_loss + 0.25 * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            used = codes.unique().numel()
            msg = f"{step},{time.time() - t0:.0f},{rec_loss.item():.4f},{vq_loss.item():.4f},{used}"
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()
        if step % 500 == 0:
            p, u = evaluate(model, held)
            print(f"step {step}: held-out PSNR {p:.2f} dB, codes used {u}", flush=True)
            log.write(f"# step {step} heldout_psnr {p:.2f} codes_used {u}\n")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    p, u = evaluate(model, held)
    msg = f"# stopped at step {step}: held-out PSNR {p:.2f} dB over {len(held)} images, codes used {u}"
    print(msg)
    log.write(msg + "\n")


if __name__ == "__main__":
    main()
