"""Generate examples/shapes: a tiny, CC0 captioning dataset in the exact Flickr8k layout.

It exists so the first command in the README, the tests and training smoke tests run
without downloading anything, and so a model can visibly learn something in seconds:
every caption is true of its picture and the vocabulary is small.

    python scripts/assets/make_shapes.py            # writes examples/shapes/
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 96
COUNTS = {"train": 40, "dev": 10, "test": 10}
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
ADJECTIVE = {"circle": "round", "square": "square", "triangle": "triangular"}
HALF = {"small": 11, "large": 19}  # half the shape's width in pixels
CENTRE_X = {"left": 26, "right": 70}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, size: str, x: int, y: int) -> None:
    h = HALF[size]
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
    elif shape == "square":
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    else:
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)


def captions_for(background: str, shapes: list[dict[str, str]]) -> list[str]:
    """Five different captions, each true of the picture: the point is a learnable, honest signal."""
    if len(shapes) == 1:
        s = shapes[0]
        c, k, z, p = s["colour"], s["shape"], s["size"], s["side"]
        return [
            f"a {c} {k} on a {background} background",
            f"a {z} {c} {k}",
            f"one {c} {ADJECTIVE[k]} shape",
            f"there is a {c} {k} on the {p}",
            f"a {z} {k} coloured {c} on the {p} side of the image",
        ]
    a, b = shapes  # a is on the left, b on the right
    return [
        f"a {a['colour']} {a['shape']} and a {b['colour']} {b['shape']}",
        f"a {a['colour']} {a['shape']} on the left and a {b['colour']} {b['shape']} on the right",
        f"two shapes on a {background} background",
        f"a {b['size']} {b['colour']} {b['shape']} next to a {a['size']} {a['colour']} {a['shape']}",
        f"a {a['shape']} to the left of a {b['shape']} on a {background} background",
    ]


def make(out: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)

    def pick(options: Iterable[str]) -> str:
        return str(rng.choice(list(options)))

    (out / "images").mkdir(parents=True, exist_ok=True)
    names, lines = [], []
    for i in range(sum(COUNTS.values())):
        background = pick(BACKGROUNDS)
        sides = ["left", "right"] if rng.random() < 0.5 else [pick(CENTRE_X)]
        shapes: list[dict[str, str]] = []
        for side in sides:
            while True:  # two shapes in one picture must be told apart by colour or shape
                s = {"shape": pick(SHAPES), "colour": pick(COLOURS), "size": pick(HALF), "side": side}
                if not shapes or (s["shape"], s["colour"]) != (shapes[0]["shape"], shapes[0]["colour"]):
                    break
            shapes.append(s)
        image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
        draw = ImageDraw.Draw(image)
        for s in shapes:
            x = CENTRE_X[s["side"]] + int(rng.integers(-2, 3))
            y = SIZE // 2 + int(rng.integers(-12, 13))
            draw_shape(draw, s["shape"], s["colour"], s["size"], x, y)
        name = f"shape_{i:03d}.jpg"
        image.save(out / "images" / name, quality=90)
        names.append(name)
        lines += [f"{name}#{j}\t{caption}\n" for j, caption in enumerate(captions_for(background, shapes))]
    (out / "Flickr8k.token.txt").write_text("".join(lines))
    start = 0
    for split, n in COUNTS.items():
        (out / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{name}\n" for name in names[start : start + n]))
        start += n


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "examples" / "shapes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make(args.out, args.seed)
    print(f"wrote {sum(COUNTS.values())} images to {args.out}")
