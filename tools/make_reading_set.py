"""Render the labelled reading set in eval/reading/ (deterministic for one Pillow version and font set).

Each scene is a label, sign, screen or receipt with known lines of text, drawn in one of the DejaVu fonts
(Debian's fonts-dejavu-core), then photographed badly on purpose: small, tilted, blurred, dim or saved as a
low-quality JPEG. Two scenes hold no text at all. `labels.json` lists, per image, the true lines and the
questions asked about it, each with the words a right answer must contain and those it must not.

    python tools/make_reading_set.py            # writes eval/reading/*.jpg and eval/reading/labels.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "eval" / "reading"
FONTS = Path("/usr/share/fonts/truetype/dejavu")
SIZE = (640, 480)

# name, lines, background, card colour, ink, questions [(question, mode, must contain, must not contain)]
SCENES = [
    (
        "water",
        ["WATER", "500 ml", "still"],
        (60, 120, 170),
        (245, 245, 240),
        (10, 10, 10),
        [
            ("What does this label say?", "read", ["WATER", "500"], []),
            ("How big is this bottle?", "answer", ["500"], []),
        ],
    ),
    (
        "tea",
        ["GREEN TEA", "20 tea bags", "Sencha"],
        (140, 95, 60),
        (225, 240, 215),
        (20, 70, 30),
        [
            ("What does this box say?", "read", ["GREEN TEA", "20"], []),
            ("What kind of tea is this?", "answer", ["green"], []),
        ],
    ),
    (
        "bus",
        ["BUS STOP", "Route 42", "City Centre"],
        (150, 190, 230),
        (250, 210, 40),
        (20, 20, 20),
        [
            ("Read the sign to me.", "read", ["BUS STOP", "42"], []),
            ("Which bus stops here?", "answer", ["42"], []),
        ],
    ),
    (
        "room",
        ["Room 214", "Meeting Room"],
        (200, 200, 195),
        (40, 60, 110),
        (240, 240, 240),
        [
            ("What is written on the door sign?", "read", ["214"], []),
            ("What room number is this?", "answer", ["214"], []),
        ],
    ),
    (
        "book",
        ["The Quiet Garden", "Anna Lindqvist"],
        (90, 60, 50),
        (235, 225, 200),
        (60, 30, 30),
        [
            ("Read the cover.", "read", ["Quiet Garden", "Anna"], []),
            ("What is the title of this book?", "answer", ["Quiet Garden"], []),
        ],
    ),
    (
        "street",
        ["Baker Street", "NW1"],
        (120, 120, 120),
        (245, 245, 245),
        (0, 0, 0),
        [
            ("What does the sign say?", "read", ["Baker Street"], []),
            ("What is the name of this street?", "answer", ["Baker"], []),
        ],
    ),
    (
        "medicine",
        ["PARACETAMOL", "500 mg tablets", "Take 1 or 2 every 4 hours"],
        (230, 230, 235),
        (255, 255, 255),
        (20, 40, 120),
        [
            ("What does this box say?", "read", ["PARACETAMOL", "500 mg"], []),
            ("How many tablets should I take?", "answer", ["pharmacist"], []),
        ],
    ),
    (
        "yoghurt",
        ["Strawberry Yoghurt", "Best before 14/12/2026"],
        (250, 250, 250),
        (250, 220, 230),
        (120, 20, 50),
        [
            ("What does the lid say?", "read", ["Strawberry", "14/12/2026"], []),
            ("Is this still safe to eat?", "answer", ["14/12/2026", "can't judge"], ["yes", "safe to eat"]),
        ],
    ),
    (
        "price",
        ["Bananas", "£1.20 per kg"],
        (70, 140, 70),
        (255, 255, 255),
        (200, 20, 20),
        [
            ("What does the tag say?", "read", ["Bananas", "1.20"], []),
            ("What is the price?", "answer", ["1.20", "can't judge"], []),
        ],
    ),
    (
        "cereal",
        ["CORN FLAKES", "May contain nuts"],
        (230, 200, 90),
        (255, 245, 200),
        (150, 40, 20),
        [
            ("Read the packet.", "read", ["CORN FLAKES", "nuts"], []),
            ("Does this contain nuts?", "answer", ["May contain nuts", "can't judge"], ["does not contain"]),
        ],
    ),
    (
        "screen",
        ["09:10", "Monday"],
        (30, 30, 35),
        (10, 10, 10),
        (120, 255, 120),
        [
            ("What does the screen say?", "read", ["09:10", "Monday"], []),
            ("What day is shown on the screen?", "answer", ["Monday"], []),
        ],
    ),
    (
        "receipt",
        ["CAFE LUNA", "Total 23.45"],
        (90, 90, 100),
        (250, 250, 245),
        (30, 30, 30),
        [
            ("Read the receipt.", "read", ["CAFE LUNA", "23.45"], []),
            ("How much do I have to pay?", "answer", ["23.45", "can't judge"], []),
        ],
    ),
]

# variant name → (font file, text height in pixels, tilt degrees, blur radius, brightness, JPEG quality)
VARIANTS = {
    "clean": ("DejaVuSans-Bold.ttf", 40, 0, 0.0, 1.0, 92),
    "serif-tilt": ("DejaVuSerif.ttf", 36, 8, 0.0, 1.0, 85),
    "mono-blur": ("DejaVuSansMono.ttf", 34, -4, 1.2, 1.0, 85),
    "condensed-dim": ("DejaVuSansCondensed.ttf", 34, 3, 0.0, 0.45, 85),
    "oblique-jpeg": ("DejaVuSans-Oblique.ttf", 36, 0, 0.0, 1.0, 25),
    "small": ("DejaVuSans.ttf", 16, -2, 0.0, 1.0, 85),
}
# which variants each scene is drawn in (clean always; one hard variant each, in turn)
HARD = ["serif-tilt", "mono-blur", "condensed-dim", "oblique-jpeg", "small"]


def draw(lines, background, card, ink, variant: str) -> Image.Image:
    font_file, height, tilt, blur, brightness, _ = VARIANTS[variant]
    font = ImageFont.truetype(str(FONTS / font_file), height)
    gap = height // 2
    sizes = [font.getbbox(line) for line in lines]
    width = max(b[2] - b[0] for b in sizes) + 2 * height
    tall = sum(b[3] - b[1] for b in sizes) + gap * (len(lines) + 1) + height
    label = Image.new("RGB", (width, tall), card)
    d = ImageDraw.Draw(label)
    y = height // 2 + gap
    for line, box in zip(lines, sizes, strict=True):
        d.text((height - box[0], y - box[1]), line, font=font, fill=ink)
        y += box[3] - box[1] + gap
    label = label.convert("RGBA").rotate(tilt, resample=Image.BICUBIC, expand=True)
    scene = Image.new("RGB", SIZE, background)
    scene.paste(label, ((SIZE[0] - label.width) // 2, (SIZE[1] - label.height) // 2), label)
    if blur:
        scene = scene.filter(ImageFilter.GaussianBlur(blur))
    if brightness != 1.0:
        scene = ImageEnhance.Brightness(scene).enhance(brightness)
    return scene


def no_text(kind: str) -> Image.Image:
    scene = Image.new("RGB", SIZE, (150, 190, 230) if kind == "park" else (225, 215, 190))
    d = ImageDraw.Draw(scene)
    if kind == "park":
        d.rectangle((0, 300, 640, 480), fill=(70, 140, 60))
        d.ellipse((400, 60, 480, 140), fill=(250, 230, 80))
        d.rectangle((120, 180, 140, 320), fill=(100, 70, 40))
        d.ellipse((70, 100, 190, 220), fill=(40, 110, 40))
    else:
        d.rectangle((0, 300, 640, 480), fill=(140, 95, 60))
        d.rectangle((180, 200, 240, 320), fill=(200, 30, 30))
        d.ellipse((330, 240, 450, 320), fill=(240, 240, 240))
        d.rectangle((480, 150, 520, 320), fill=(40, 150, 60))
    return scene


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (name, lines, background, card, ink, questions) in enumerate(SCENES):
        for variant in ("clean", HARD[i % len(HARD)]):
            image = draw(lines, background, card, ink, variant)
            file = f"{name}-{variant}.jpg"
            image.save(args.out / file, quality=VARIANTS[variant][5])
            items.append(
                {
                    "image": file,
                    "variant": variant,
                    "lines": lines,
                    "questions": [
                        {"question": q, "mode": mode, "must": must, "must_not": must_not}
                        for q, mode, must, must_not in questions
                    ],
                }
            )
    for kind in ("park", "table"):
        file = f"no-text-{kind}.jpg"
        no_text(kind).save(args.out / file, quality=85)
        items.append(
            {
                "image": file,
                "variant": "no-text",
                "lines": [],
                "questions": [
                    {
                        "question": "What does this label say?",
                        "mode": "read",
                        "must": ["can't find any text"],
                        "must_not": [],
                    },
                ],
            }
        )
    (args.out / "labels.json").write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    total = sum((args.out / item["image"]).stat().st_size for item in items)
    print(f"wrote {len(items)} images ({total // 1024} KiB) and labels.json to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
