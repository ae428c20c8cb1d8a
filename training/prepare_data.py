"""Builds the emoji training set: the ~1,900 base emoji of emoji-datasource (one class each, ids
in its sort order) in up to five art styles, 64 px, composited on white.

    python training/prepare_data.py      # writes training/data/{images,labels,styles,heldout}.npy

Styles and how each is mapped to a class:
- noto      emoji-datasource-google (Noto Emoji, Apache-2.0): the class list itself.
- twemoji   emoji-datasource-twitter (Twemoji artwork, CC-BY-4.0): same emoji.json, by code points.
- fluent    @iconify-json/fluent-emoji (Microsoft Fluent Emoji colour, MIT): SVG inside JSON,
            keyed by CLDR name; code points -> CLDR name through unicode-emoji-json (MIT),
            then by the class's own names as a fallback.
- flat      @iconify-json/fluent-emoji-flat (Fluent Emoji flat, MIT): as fluent.
- 3d        @lobehub/fluent-emoji-3d (Fluent Emoji 3D, MIT): WebP files named by code points.

A fixed ~5% of the (class, style) images (chosen by a hash, so the split never changes) is held
out: never trained on, used to measure generalisation (held-out NLL, classifier accuracy).
Augmentation (small shifts and scales) happens at training time (`augment` below).

Needs npm (to fetch the packages), numpy, pillow and resvg-py (SVG rasteriser). The data is not
committed.
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from collections import Counter

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
STYLES = ["noto", "twemoji", "fluent", "flat", "3d"]
PACKAGES = {
    "google": "emoji-datasource-google@16",
    "twitter": "emoji-datasource-twitter@16",
    "fluent": "@iconify-json/fluent-emoji@1.2.7",
    "flat": "@iconify-json/fluent-emoji-flat@1.2.6",
    "3d": "@lobehub/fluent-emoji-3d@1.1.0",
    "cldr": "unicode-emoji-json@0.9.0",
}
HELDOUT_PERCENT = 5


def fetch(package: str, dest: str) -> str:
    """npm pack + unpack once; returns the package folder."""
    os.makedirs(dest, exist_ok=True)
    unpacked = os.path.join(dest, re.sub(r"[^A-Za-z0-9.-]+", "_", package))
    if not os.path.isdir(unpacked):
        name = subprocess.run(
            ["npm", "pack", package, "--silent"], cwd=dest, check=True, capture_output=True, text=True
        ).stdout.strip().splitlines()[-1]
        with tarfile.open(os.path.join(dest, name)) as t:
            t.extractall(unpacked, filter="data")
    return os.path.join(unpacked, "package")


def words(text: str):
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def slug(text: str) -> str:
    return "-".join(words(text))


def is_heldout(cls: int, style: str) -> bool:
    h = hashlib.sha256(f"{cls}/{style}".encode()).digest()
    return int.from_bytes(h[:4], "little") % 100 < HELDOUT_PERCENT


def on_white(rgba: Image.Image, size: int) -> np.ndarray:
    rgba = rgba.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def svg_to_rgba(icon_set: dict, name: str, size: int) -> Image.Image | None:
    import resvg_py

    icons, aliases = icon_set["icons"], icon_set.get("aliases", {})
    while name not in icons and name in aliases:
        name = aliases[name]["parent"]
    if name not in icons:
        return None
    icon = icons[name]
    w, h = icon.get("width", icon_set.get("width", 16)), icon.get("height", icon_set.get("height", 16))
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{size}" height="{size}" viewBox="0 0 {w} {h}">{icon["body"]}</svg>'
    )
    png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size)
    return Image.open(io.BytesIO(bytes(png)))


def cldr_names(cldr_root: str) -> dict:
    """unified code points (upper hex, '-'-joined, without FE0F) -> CLDR slug."""
    data = json.load(open(os.path.join(cldr_root, "data-by-emoji.json")))
    out = {}
    for ch, e in data.items():
        key = "-".join(f"{ord(c):X}" for c in ch if ord(c) != 0xFE0F)
        out[key] = e["slug"].replace("_", "-")
    return out


def fluent_name(e: dict, icon_set: dict, cldr: dict) -> str | None:
    key = "-".join(p for p in e["unified"].split("-") if p != "FE0F")
    candidates = [cldr.get(key)]
    candidates += [slug(e.get("name") or "")] + [slug(s) for s in e["short_names"]]
    if e["category"] == "Flags" and e.get("name", "").endswith(" Flag"):
        candidates.append("flag-" + slug(e["name"][: -len(" Flag")]))
    names = set(icon_set["icons"]) | set(icon_set.get("aliases", {}))
    return next((c for c in candidates if c and c in names), None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=DATA)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    roots = {k: fetch(p, os.path.join(args.out, "npm")) for k, p in PACKAGES.items()}
    meta = json.load(open(os.path.join(roots["google"], "emoji.json")))
    meta = [e for e in meta if e.get("has_img_google") and e["category"] != "Component"]
    meta.sort(key=lambda e: e["sort_order"])
    twitter_img = os.path.join(roots["twitter"], "img", "twitter", "64")
    fluent = json.load(open(os.path.join(roots["fluent"], "icons.json")))
    flat = json.load(open(os.path.join(roots["flat"], "icons.json")))
    cldr = cldr_names(roots["cldr"])
    threed = {f[: -len(".webp")].upper(): f for f in os.listdir(os.path.join(roots["3d"], "assets"))}

    images, labels, styles, held, classes = [], [], [], [], []
    per_class = []
    for e in meta:
        google = os.path.join(roots["google"], "img", "google", "64", e["image"])
        if not os.path.exists(google):
            continue
        cls = len(classes)
        found = {"noto": Image.open(google)}
        if e.get("has_img_twitter") and os.path.exists(os.path.join(twitter_img, e["image"])):
            found["twemoji"] = Image.open(os.path.join(twitter_img, e["image"]))
        for style, icon_set in (("fluent", fluent), ("flat", flat)):
            name = fluent_name(e, icon_set, cldr)
            if name is not None and (im := svg_to_rgba(icon_set, name, args.size)) is not None:
                found[style] = im
        for key in (e["unified"], "-".join(p for p in e["unified"].split("-") if p != "FE0F")):
            if key in threed:
                found["3d"] = Image.open(os.path.join(roots["3d"], "assets", threed[key]))
                break
        for style, im in found.items():
            images.append(on_white(im, args.size))
            labels.append(cls)
            styles.append(STYLES.index(style))
            held.append(is_heldout(cls, style))
        per_class.append(len(found))
        name = (e.get("name") or e["short_name"]).lower()
        keywords = sorted(set(words(e["category"]) + words(e.get("subcategory") or "")) - {"and"})
        classes.append(
            {"id": cls, "name": name, "short_names": e["short_names"], "keywords": keywords, "unified": e["unified"]}
        )
    np.save(os.path.join(args.out, "images.npy"), np.stack(images).astype(np.uint8))
    np.save(os.path.join(args.out, "labels.npy"), np.array(labels, dtype=np.int64))
    np.save(os.path.join(args.out, "styles.npy"), np.array(styles, dtype=np.int64))
    np.save(os.path.join(args.out, "heldout.npy"), np.array(held, dtype=bool))
    with open(os.path.join(args.out, "classes.json"), "w") as f:
        json.dump(classes, f, indent=0)
    report = {
        "classes": len(classes),
        "images": len(images),
        "heldout": int(sum(held)),
        "images_per_style": {STYLES[s]: n for s, n in sorted(Counter(styles).items())},
        "classes_by_style_count": dict(sorted(Counter(per_class).items())),
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


def augment(x, gen, max_shift: int = 4, scale=(0.85, 1.05)):
    """Light augmentation on the 64 px canvas: a random scale and shift per image, white fill.
    x: float tensor [B, 3, H, W] in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    s = torch.empty(b).uniform_(*scale, generator=gen)
    t = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=gen).float() * 2 / w
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1 / s
    theta[:, 1, 1] = 1 / s
    theta[:, :, 2] = -t / s[:, None]
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    # white background: shift to [-2, 0] so zero padding is white, then back
    return F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1


if __name__ == "__main__":
    main()
