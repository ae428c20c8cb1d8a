"""Trains the small emoji classifier that `zipar-studio eval` uses as an image-space metric
(top-1 / top-5 against the conditioning class, and a Frechet distance on its features).

    python training/train_classifier.py --steps 12000    # -> runs/classifier2/last.pt
    python training/export.py --classifier-only         # ships it next to the model

Trained on the real images of every style with light augmentation; the held-out split of
prepare_data.py is never trained on and measures the classifier's own accuracy (the metric only
means something if that is high). BatchNorm is folded into the convolutions at export, so the
Rust side runs conv + ReLU layers (their strides are in the file's header), a global average
pool (the feature vector) and a linear layer.
"""

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare_data import augment

HERE = os.path.dirname(os.path.abspath(__file__))
# Each stage halves the resolution with a stride-2 convolution and refines with a stride-1 one
# (64 px -> 4 x 4 before the pool). v1 (the first shipped classifier) had the stride-2 layers
# only, with 32-64-128-128 channels: 0.62 held-out top-1, underfitting.
CHANNELS = [3, 48, 48, 96, 96, 192, 192, 256, 256]
STRIDES = [2, 1, 2, 1, 2, 1, 2, 1]
# The fixed class subset of `eval`: every 8th class (the real-image statistics are taken over it).
EVAL_CLASS_STRIDE = 8


class Classifier(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False)
            for cin, cout, s in zip(CHANNELS, CHANNELS[1:], STRIDES)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in CHANNELS[1:])
        self.head = nn.Linear(CHANNELS[-1], num_classes)

    def features(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.head(F.dropout(self.features(x), 0.2, self.training))


def jitter(x, gen):
    """Colour jitter on top of `augment`: brightness, contrast and saturation per image. The styles
    of one emoji differ in shading and palette, and the metric scores VQ-decoded images, which
    are softer than the art: this is what the held-out styles need to generalise to."""
    b = x.shape[0]
    u = lambda lo, hi: torch.empty(b, 1, 1, 1).uniform_(lo, hi, generator=gen).to(x.device)
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * u(0.7, 1.3)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * u(0.8, 1.2) + u(-0.1, 0.1)
    blur = torch.rand(b, generator=gen).to(x.device) < 0.3
    if blur.any():
        x[blur] = F.avg_pool2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x.clamp(-1, 1)


def load(device):
    arr = np.load(os.path.join(HERE, "data", "images.npy"))
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = torch.from_numpy(np.load(os.path.join(HERE, "data", "labels.npy")))
    held = torch.from_numpy(np.load(os.path.join(HERE, "data", "heldout.npy")))
    return x.to(device), y.to(device), held.to(device)


@torch.no_grad()
def accuracy(model, x, y, bs=256):
    model.eval()
    top1 = top5 = 0
    for i in range(0, len(x), bs):
        logits = model(x[i : i + bs])
        t5 = logits.topk(5, dim=1).indices
        top1 += (t5[:, 0] == y[i : i + bs]).sum().item()
        top5 += (t5 == y[i : i + bs, None]).any(dim=1).sum().item()
    model.train()
    return top1 / len(x), top5 / len(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "off"], help="bf16 autocast on the CPU")
    ap.add_argument("--out", default=os.path.join(HERE, "runs", "classifier2"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    x, y, held = load(device)
    num_classes = int(y.max()) + 1
    train_x, train_y = x[~held], y[~held]
    torch.manual_seed(0)
    model = Classifier(num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    ckpt = os.path.join(args.out, "last.pt")
    step = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed at step {step}")
    gen = torch.Generator().manual_seed(step)
    t0 = time.time()
    log = open(os.path.join(args.out, "log.csv"), "a")
    while step < args.steps and time.time() - t0 < args.minutes * 60:
        idx = torch.randint(0, len(train_x), (args.batch,), generator=gen).to(device)
        xb = jitter(augment(train_x[idx], gen), gen)
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16" and device == "cpu"):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), train_y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 250 == 0 or step == args.steps:
            a1, a5 = accuracy(model, x[held], y[held])
            msg = f"{step},{time.time() - t0:.0f},{loss.item():.4f},{a1:.4f},{a5:.4f}"
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    a1, a5 = accuracy(model, x[held], y[held])
    msg = f"# stopped at step {step}: held-out top-1 {a1:.4f} top-5 {a5:.4f} over {int(held.sum())} images"
    print(msg)
    log.write(msg + "\n")


@torch.no_grad()
def export_tensors(ckpt_path: str) -> tuple[dict, dict]:
    """Folds BatchNorm into the convolutions; returns (weights, real-image feature statistics
    over the eval class subset) as float32 tensors, plus metadata for the safetensors header."""
    x, y, held = load("cpu")
    num_classes = int(y.max()) + 1
    model = Classifier(num_classes)
    state = torch.load(ckpt_path, map_location="cpu")
    model.load_state_dict(state["model"])
    model.eval()
    out = {}
    for i, (conv, norm) in enumerate(zip(model.convs, model.norms)):
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        out[f"convs.{i}.weight"] = conv.weight * scale[:, None, None, None]
        out[f"convs.{i}.bias"] = norm.bias - norm.running_mean * scale
    out["head.weight"] = model.head.weight.clone()
    out["head.bias"] = model.head.bias.clone()
    subset = (y % EVAL_CLASS_STRIDE) == 0
    feats = torch.cat([model.features(x[subset][i : i + 256]) for i in range(0, int(subset.sum()), 256)]).double()
    mu = feats.mean(0)
    cov = torch.cov(feats.T)
    out["real.mean"] = mu.float()
    out["real.cov"] = cov.float()
    a1, a5 = accuracy(model, x[held], y[held])
    meta = {
        "step": str(state["step"]),
        "heldout_top1": f"{a1:.4f}",
        "heldout_top5": f"{a5:.4f}",
        "heldout_images": str(int(held.sum())),
        "eval_class_stride": str(EVAL_CLASS_STRIDE),
        "strides": ",".join(map(str, STRIDES)),
        "real_images": str(int(subset.sum())),
    }
    # Weights in f16 (half the file; the Rust side computes in f32), statistics in f32.
    return {k: (v if k.startswith("real.") else v.half()).contiguous() for k, v in out.items()}, meta


if __name__ == "__main__":
    main()
