"""Writes the default model into assets/models/emoji/: GPT and VQ-decoder weights as f16
safetensors with LlamaGen's key names, config.json (the app's manifest), classes.json, and the
eval classifier (classifier.safetensors: BatchNorm folded, f32, with the real-image feature
statistics; see train_classifier.py).

    python training/export.py
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from train_gpt import gpt_args
from train_vq import VQ_ARGS

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "assets", "models", "emoji")
CKPT = os.path.join(HERE, "checkpoints")
# Decoding settings recommended for the built-in model (chosen with `zipar-studio eval`: the
# largest speed-up whose top-1 and Frechet distance stay within the targets; README, "The
# built-in model"): the app and the CLI start from these.
DEFAULTS = {"cfg": 2.0, "temperature": 1.0, "window": 8}


def load_vq(run_dir: str):
    """The VQ run's last.pt, else the committed weights-only checkpoint (state dict, step)."""
    path = os.path.join(run_dir, "last.pt")
    if os.path.exists(path):
        vq = torch.load(path, map_location="cpu")
        return vq["model"], vq["step"]
    from safetensors import safe_open

    with safe_open(os.path.join(CKPT, "vq.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, int(f.metadata().get("step", 0))


def export_classifier(ckpt: str, out: str):
    from train_classifier import export_tensors

    tensors, meta = export_tensors(ckpt)
    save_file(tensors, os.path.join(out, "classifier.safetensors"), metadata=meta)
    print("classifier:", meta)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpt", default=os.path.join(HERE, "runs", "gpt"))
    ap.add_argument("--vq", default=os.path.join(HERE, "runs", "vq"))
    ap.add_argument("--classifier", default=os.path.join(HERE, "runs", "classifier2", "last.pt"))
    ap.add_argument("--classifier-only", action="store_true",
                    help="write classifier.safetensors only (the GPT and VQ stay as shipped)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--defaults", default=json.dumps(DEFAULTS),
                    help="decoding settings the app starts from (config.json \"defaults\")")
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    if args.classifier_only:
        export_classifier(args.classifier, out)
        return
    classes = json.load(open(os.path.join(HERE, "data", "classes.json")))
    gpt = torch.load(os.path.join(args.gpt, "last.pt"), map_location="cpu")
    vq_state, vq_step = load_vq(args.vq)
    gsd = {k: v.half().contiguous() for k, v in gpt["model"].items() if k != "rope"}
    keep = ("quantize.", "post_quant_conv", "decoder.")
    vsd = {k: v.half().contiguous() for k, v in vq_state.items() if k.startswith(keep)}
    save_file(gsd, os.path.join(out, "gpt.safetensors"))
    save_file(vsd, os.path.join(out, "vq.safetensors"))
    # Weights-only copy of the whole VQ (encoder included, which the app does not need) so
    # that training can resume in a later sitting without the large optimiser checkpoints.
    full_vq = {k: v.half().contiguous() for k, v in vq_state.items()}
    os.makedirs(CKPT, exist_ok=True)
    save_file(full_vq, os.path.join(CKPT, "vq.safetensors"), metadata={"step": str(vq_step)})
    ga = gpt_args(len(classes))
    cfg = {
        "kind": "llamagen-c2i",
        "name": "Emoji (built-in)",
        "gpt_weights": "gpt.safetensors",
        "vq_weights": "vq.safetensors",
        "classes": "classes.json",
        "classifier": "classifier.safetensors",
        "grid_h": ga.grid_h,
        "grid_w": ga.grid_w,
        "dim": ga.dim,
        "n_layer": ga.n_layer,
        "n_head": ga.n_head,
        "vocab_size": ga.vocab_size,
        "num_classes": ga.num_classes,
        "cls_token_num": ga.cls_token_num,
        "multiple_of": ga.multiple_of,
        "vq": {
            "codebook_size": VQ_ARGS.codebook_size,
            "codebook_embed_dim": VQ_ARGS.codebook_embed_dim,
            "z_channels": VQ_ARGS.z_channels,
            "ch": VQ_ARGS.ch,
            "ch_mult": VQ_ARGS.ch_mult,
            "num_res_blocks": VQ_ARGS.num_res_blocks,
            "norm_groups": VQ_ARGS.norm_groups,
        },
        "defaults": json.loads(args.defaults),
        "training": {"gpt_steps": gpt["step"], "vq_steps": vq_step},
    }
    export_classifier(args.classifier, out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    slim = [{k: c[k] for k in ("id", "name", "short_names", "keywords", "unified")} for c in classes]
    with open(os.path.join(out, "classes.json"), "w") as f:
        json.dump(slim, f, separators=(",", ":"))
    if os.path.exists(os.path.join(args.vq, "log.csv")):
        shutil.copy(os.path.join(args.vq, "log.csv"), os.path.join(out, "vq_log.csv"))
    shutil.copy(os.path.join(args.gpt, "log.csv"), os.path.join(out, "gpt_log.csv"))
    print("wrote", os.path.abspath(out))


if __name__ == "__main__":
    main()
