"""Make the demo's photo and spoken question: a tea box's label on a table, and "What does this label say?".

The photo is drawn (DejaVu fonts, fonts-dejavu-core), a little turned and softened as a hand-held camera would
see it; the question is spoken by the bundled Piper voice, as assets/question.wav was. Deterministic for one
Pillow version and voice.

    python tools/make_demo_assets.py     # writes assets/label.jpg and assets/question-label.wav
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FONTS = Path("/usr/share/fonts/truetype/dejavu")
QUESTION = "What does this label say?"
LINES = [
    ("GREEN TEA", "DejaVuSerif-Bold.ttf", 42),
    ("with lemon", "DejaVuSans.ttf", 34),
    ("20 tea bags", "DejaVuSans.ttf", 30),
]


def photo() -> Image.Image:
    scene = Image.new("RGB", (640, 480), (205, 190, 160))  # wall
    d = ImageDraw.Draw(scene)
    d.rectangle((0, 330, 640, 480), fill=(120, 80, 50))  # table
    d.rectangle((120, 110, 520, 380), fill=(30, 110, 60))  # the box's front
    label = Image.new("RGB", (320, 200), (245, 240, 220))
    ld = ImageDraw.Draw(label)
    y = 22
    for text, font_file, size in LINES:
        font = ImageFont.truetype(str(FONTS / font_file), size)
        box = font.getbbox(text)
        ld.text(((320 - (box[2] - box[0])) // 2 - box[0], y - box[1]), text, font=font, fill=(25, 60, 35))
        y += box[3] - box[1] + 26
    label = label.convert("RGBA").rotate(4, resample=Image.BICUBIC, expand=True)
    scene.paste(label, (160, 130), label)
    return scene.filter(ImageFilter.GaussianBlur(0.6))


def main(argv: list[str] | None = None) -> int:
    from edgevision.speech.audio import write_wav
    from edgevision.speech.synthesis import PiperSynthesizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voice", type=Path, default=ROOT / "models" / "piper" / "en_US-joe-medium.onnx")
    parser.add_argument("--out", type=Path, default=ROOT / "assets")
    args = parser.parse_args(argv)
    photo().save(args.out / "label.jpg", quality=88)
    with PiperSynthesizer(args.voice) as piper:
        write_wav(args.out / "question-label.wav", piper.synthesize(QUESTION))
    print(f"wrote {args.out / 'label.jpg'} and {args.out / 'question-label.wav'} ({QUESTION!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
