"""Builds the emoji training set from the npm package emoji-datasource-google (Noto Emoji
artwork, Apache-2.0): the base emoji (skin-tone variants are not separate entries in
emoji.json and are skipped), 64 px, composited on white.

    python training/prepare_data.py            # writes training/data/{images.npy,classes.json}

Needs npm (to fetch the package) and numpy + pillow. The data is not committed.
"""

import argparse
import json
import os
import re
import subprocess
import tarfile

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def fetch(package: str, dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    unpacked = os.path.join(dest, package)
    if os.path.isdir(unpacked):
        return unpacked
    name = subprocess.run(
        ["npm", "pack", package, "--silent"], cwd=dest, check=True, capture_output=True, text=True
    ).stdout.strip().splitlines()[-1]
    with tarfile.open(os.path.join(dest, name)) as t:
        t.extractall(unpacked, filter="data")
    return unpacked


def words(text: str):
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--package", default="emoji-datasource-google@16")
    ap.add_argument("--out", default=os.path.join(HERE, "data"))
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    root = os.path.join(fetch(args.package, args.out), "package")
    meta = json.load(open(os.path.join(root, "emoji.json")))
    meta = [e for e in meta if e.get("has_img_google") and e["category"] != "Component"]
    meta.sort(key=lambda e: e["sort_order"])
    images, classes = [], []
    for e in meta:
        path = os.path.join(root, "img", "google", "64", e["image"])
        if not os.path.exists(path):
            continue
        rgba = Image.open(path).convert("RGBA")
        if rgba.size != (args.size, args.size):
            rgba = rgba.resize((args.size, args.size), Image.LANCZOS)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        images.append(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
        name = (e.get("name") or e["short_name"]).lower()
        keywords = sorted(set(words(e["category"]) + words(e.get("subcategory") or "")) - {"and"})
        classes.append(
            {
                "id": len(classes),
                "name": name,
                "short_names": e["short_names"],
                "keywords": keywords,
                "unified": e["unified"],
            }
        )
    arr = np.stack(images).astype(np.uint8)
    np.save(os.path.join(args.out, "images.npy"), arr)
    with open(os.path.join(args.out, "classes.json"), "w") as f:
        json.dump(classes, f, indent=0)
    print(f"{len(classes)} classes, images {arr.shape}")


if __name__ == "__main__":
    main()
