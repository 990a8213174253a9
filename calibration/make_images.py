"""Draw the calibration images in images/ (deterministic: the same PIL version gives the same pixels).

Simple scenes of what the device is pointed at: a table with objects, a street crossing, a label, a
room with a door, a screen showing the time. The synthetic vision tower does not understand them; they
give the router image rows with the colour and edge statistics of real photos, for real models too.

    .venv/bin/python calibration/make_images.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (224, 168)
OUT = Path(__file__).resolve().parent / "images"


def table(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((0, 0, 224, 100), fill=(225, 215, 190))
    d.rectangle((0, 100, 224, 168), fill=(140, 95, 60))
    d.rectangle((40, 60, 70, 110), fill=(200, 30, 30))  # red cup
    d.rectangle((90, 30, 110, 110), fill=(40, 150, 60))  # green bottle
    d.rectangle((130, 95, 200, 112), fill=(30, 60, 160))  # two books
    d.rectangle((135, 83, 195, 95), fill=(220, 200, 40))


def street(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((0, 0, 224, 70), fill=(150, 190, 230))
    d.rectangle((0, 70, 224, 168), fill=(80, 80, 85))
    for x in range(10, 224, 40):
        d.rectangle((x, 120, x + 22, 160), fill=(235, 235, 235))  # zebra crossing
    d.rectangle((150, 70, 215, 105), fill=(30, 40, 120))  # parked car
    d.rectangle((20, 20, 28, 80), fill=(40, 40, 40))  # traffic light
    d.ellipse((16, 14, 32, 30), fill=(40, 200, 60))


def label(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((0, 0, 224, 168), fill=(60, 120, 170))
    d.rectangle((50, 20, 174, 150), fill=(245, 245, 240))
    d.text((62, 40), "WATER", fill=(10, 10, 10))
    d.text((62, 70), "500 ml", fill=(10, 10, 10))
    d.text((62, 100), "still", fill=(90, 90, 90))


def room(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((0, 0, 224, 120), fill=(120, 150, 200))
    d.rectangle((0, 120, 224, 168), fill=(160, 120, 80))
    d.rectangle((150, 30, 200, 125), fill=(110, 70, 40))  # open door
    d.rectangle((158, 38, 192, 125), fill=(30, 30, 30))
    d.rectangle((20, 80, 110, 125), fill=(180, 60, 70))  # sofa
    d.rectangle((30, 20, 70, 50), fill=(240, 230, 200))  # picture


def screen(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((0, 0, 224, 168), fill=(30, 30, 35))
    d.rectangle((30, 30, 194, 130), fill=(10, 10, 10))
    d.text((80, 65), "09:10", fill=(120, 255, 120))
    d.text((70, 95), "Monday", fill=(200, 200, 200))


SCENES = {"table": table, "street": street, "label": label, "room": room, "screen": screen}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for i, (name, draw) in enumerate(SCENES.items()):
        image = Image.new("RGB", SIZE, (0, 0, 0))
        draw(ImageDraw.Draw(image))
        path = OUT / f"{i + 1:02d}-{name}.png"
        image.save(path, optimize=True)
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
