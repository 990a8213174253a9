"""The OCR pipeline: text detection → page and line orientation → recognition → lines in reading order.

Pre- and post-processing follow PaddleOCR's PP-OCRv5 pipeline (DB detection with its box expansion, the
perspective crop of each box, the 0°/180° line classifier, CTC decoding of the recogniser), written with
numpy and OpenCV basics only. Two things are added for a camera held by someone who cannot see the page:

- Page orientation: when most detected boxes stand upright (the page is turned 90°), the page is turned
  back before anything is read, and turned 180° when most lines read upside down, so the reading order is
  the page's own, not the sensor's.
- Reading order: boxes whose vertical extents overlap by half the smaller height are one line, read left
  to right; lines are read top to bottom.

Each line carries the recogniser's confidence (the mean probability of its characters); lines below
`drop_below`, and lines without a letter or digit (a round lamp read as "•"), are not text and are dropped, lines below `uncertain_below` are kept and
marked uncertain, so the answer can say so.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from edgevision.errors import InputError
from edgevision.ocr.models import OcrBackend, load_characters

logger = logging.getLogger(__name__)

# PP-OCRv5's detection input: ImageNet normalisation of the BGR image, sides a multiple of 32.
DET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
DET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DET_BINARY = 0.3  # probability above which a pixel is text
DET_BOX = 0.6  # mean probability inside a box below which it is dropped
DET_UNCLIP = 1.6  # DB's box expansion ratio
DET_MAX_BOXES = 1000
REC_HEIGHT = 48
REC_MIN_WIDTH = 320
REC_BATCH = 6
CLS_SHAPE = (48, 192)
CLS_FLIP = 0.9  # a line the classifier is this sure reads upside down is also read turned
FLIP_UNSURE = (0.2, 0.8)  # a page vote between these is settled by the recogniser's confidence
EDGE_CHAR = 0.5  # a character at a line's end read with less confidence than this is dropped
SMALLEST_IMAGE = 8  # pixels: a smaller side cannot hold a readable character


@dataclass(frozen=True)
class TextLine:
    """One line of text as read, with its box (4 corners, clockwise from top-left, in the frame's pixels)."""

    text: str
    confidence: float
    box: tuple[tuple[float, float], ...]
    uncertain: bool = False


@dataclass(frozen=True)
class Reading:
    """Everything read in one frame, in reading order."""

    lines: tuple[TextLine, ...] = ()
    rotation: int = 0
    """Degrees (0, 90, 180, 270) the frame was turned counter-clockwise to stand upright."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    @property
    def uncertain(self) -> bool:
        return any(line.uncertain for line in self.lines)

    def __bool__(self) -> bool:
        return bool(self.lines)


class TextReader:
    """Reads the text in PIL images with the three OCR networks of one back-end."""

    def __init__(
        self,
        backend: OcrBackend,
        dictionary,
        *,
        max_side: int = 960,
        max_upscale: float = 4.0,
        drop_below: float = 0.5,
        uncertain_below: float = 0.85,
    ) -> None:
        self.backend = backend
        self.characters = load_characters(dictionary)
        self.max_side = max_side
        self.max_upscale = max_upscale
        self.drop_below = drop_below
        self.uncertain_below = uncertain_below

    def close(self) -> None:
        self.backend.close()

    def read(self, image) -> Reading:
        """All text lines in one PIL image (any mode), in reading order."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        bgr = _to_bgr(image)
        if min(bgr.shape[:2]) < SMALLEST_IMAGE:
            return Reading(timings={"ocr": time.perf_counter() - started})
        boxes = self.detect(bgr)
        timings["ocr_detect"] = time.perf_counter() - started
        rotation = 0
        if len(boxes) and _mostly_upright(boxes):  # the page is turned by 90°: turn it back
            bgr, boxes = _rotate_page(bgr, boxes, 90)
            rotation = 90
        boxes = _join_pieces(boxes)
        crops = [_crop(bgr, box) for box in boxes]
        upside = self.orientation(crops)
        timings["ocr_orientation"] = time.perf_counter() - started - sum(timings.values())
        # The page's way up: the classifier's vote weighted by line length; where it is unsure (small text
        # gives it little to go on), whichever way the recogniser reads with more confidence.
        texts = flipped = None
        if crops:
            vote = float(np.average(upside, weights=[c.shape[1] for c in crops]))
            if FLIP_UNSURE[0] < vote < FLIP_UNSURE[1]:
                texts = self.recognize(crops)
                flipped = self.recognize([_turn(c) for c in crops])
                turn_page = _weight(flipped) > _weight(texts)
            else:
                turn_page = vote >= FLIP_UNSURE[1]
            if turn_page:
                bgr, boxes = _rotate_page(bgr, boxes, 180)
                rotation = (rotation + 180) % 360
                crops = [_turn(c) for c in crops]
                upside = [1.0 - u for u in upside]
                texts, flipped = flipped, texts
        if texts is None:
            texts = self.recognize(crops)
        # single lines the classifier is sure read upside down on this page: kept the way that reads better
        doubt = [i for i, u in enumerate(upside) if u >= CLS_FLIP]
        if doubt:
            alternatives = flipped or self.recognize(
                [_turn(c) if i in doubt else c[:1, :1] for i, c in enumerate(crops)]
            )
            for i in doubt:
                if alternatives[i][1] > texts[i][1]:
                    texts[i] = alternatives[i]
        timings["ocr_recognize"] = time.perf_counter() - started - sum(timings.values())
        words = []
        for box, (text, confidence) in zip(boxes, texts, strict=True):
            text = " ".join(text.split())
            if confidence < self.drop_below or not any(ch.isalnum() for ch in text):  # noise, or a lone symbol
                continue
            words.append((box, text, confidence))
        lines = []
        for group in _lines(words):
            text = " ".join(w[1] for w in group)
            lengths = [len(w[1]) for w in group]
            confidence = float(np.average([w[2] for w in group], weights=lengths))
            points = np.concatenate([w[0] for w in group])
            corners = _unrotate(_bounding_quad(points), rotation, bgr.shape)
            lines.append(
                TextLine(
                    text=text,
                    confidence=confidence,
                    box=tuple((float(x), float(y)) for x, y in corners),
                    uncertain=confidence < self.uncertain_below,
                )
            )
        timings["ocr"] = time.perf_counter() - started
        reading = Reading(tuple(lines), rotation, timings)
        logger.debug("read %d lines (turned %d°) in %.3f s: %r", len(lines), rotation, timings["ocr"], reading.text)
        return reading

    # --- the three networks ------------------------------------------------------------------------------

    def detect(self, bgr: np.ndarray) -> np.ndarray:
        """Text boxes, (N, 4, 2) float32 corners clockwise from top-left, in `bgr`'s pixels."""
        import cv2

        h, w = bgr.shape[:2]
        scale = min(self.max_side / max(h, w), self.max_upscale)
        rh, rw = (max(32, round(side * scale / 32) * 32) for side in (h, w))
        resized = cv2.resize(bgr, (rw, rh), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
        x = (resized.astype(np.float32) / 255.0 - DET_MEAN) / DET_STD
        prob = self.backend.run("det", x.transpose(2, 0, 1)[None])[0, 0]
        return _db_boxes(prob, w / rw, h / rh, w, h)

    def orientation(self, crops: list[np.ndarray]) -> list[float]:
        """For each line crop, the classifier's probability that it reads upside down."""
        upside: list[float] = []
        for start in range(0, len(crops), REC_BATCH):
            batch = np.stack([_rec_input(c, *CLS_SHAPE) for c in crops[start : start + REC_BATCH]])
            upside += [float(p[1]) for p in self.backend.run("cls", batch)]
        return upside

    def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """Text and confidence of each line crop (batched by similar width, as PaddleOCR does)."""
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        order = sorted(range(len(crops)), key=lambda i: crops[i].shape[1] / max(crops[i].shape[0], 1))
        for start in range(0, len(order), REC_BATCH):
            chunk = order[start : start + REC_BATCH]
            ratio = max(crops[i].shape[1] / max(crops[i].shape[0], 1) for i in chunk)
            width = max(REC_MIN_WIDTH, math.ceil(REC_HEIGHT * ratio))
            width = min(width, getattr(self.backend, "max_rec_width", None) or width)  # a plan's widest shape
            batch = np.stack([_rec_input(crops[i], REC_HEIGHT, width) for i in chunk])
            probs = self.backend.run("rec", batch)
            for i, p in zip(chunk, probs, strict=True):
                results[i] = self._ctc(p)
        return results

    def _ctc(self, probs: np.ndarray) -> tuple[str, float]:
        """Greedy CTC decoding; characters at either end the recogniser gives less than even odds (a card's edge
        read as "I") are dropped, but still count in the confidence: the mean probability of all characters read."""
        best = probs.argmax(axis=1)
        keep = best != 0
        keep[1:] &= best[1:] != best[:-1]
        chars = [self.characters[i] if i < len(self.characters) else "" for i in best[keep]]
        odds = probs.max(axis=1)[keep]
        start, end = 0, len(chars)
        while start < end and odds[start] < EDGE_CHAR:
            start += 1
        while end > start and odds[end - 1] < EDGE_CHAR:
            end -= 1
        if start == end:
            return "", 0.0
        return "".join(chars[start:end]), float(odds.mean())


# --- geometry -------------------------------------------------------------------------------------------


def _turn(crop: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(crop[::-1, ::-1])


def _weight(texts: list[tuple[str, float]]) -> float:
    return sum(len(text) * confidence for text, confidence in texts)


def _to_bgr(image) -> np.ndarray:
    try:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (AttributeError, OSError, ValueError) as exc:
        raise InputError(f"cannot read text in this image ({exc})") from exc
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _order(points: np.ndarray) -> np.ndarray:
    """4 points → clockwise from top-left."""
    s = points.sum(axis=1)
    d = np.diff(points, axis=1).ravel()
    rest = [i for i in range(4) if i not in (int(np.argmin(s)), int(np.argmax(s)))]
    if len(rest) != 2:  # degenerate (a square at 45°): fall back to angle order
        centre = points.mean(axis=0)
        angles = np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0])
        points = points[np.argsort(angles)]
        start = int(np.argmin(points.sum(axis=1)))
        return np.roll(points, -start, axis=0).astype(np.float32)
    tr, bl = sorted(rest, key=lambda i: d[i])
    return np.array([points[np.argmin(s)], points[tr], points[np.argmax(s)], points[bl]], dtype=np.float32)


def _db_boxes(prob: np.ndarray, sx: float, sy: float, width: int, height: int) -> np.ndarray:
    """DB post-processing: threshold, contours, minimum-area boxes scored and expanded, back to image pixels.

    DB expands each box by area × ratio / perimeter on every side (PaddleOCR does it with a polygon offset;
    for the rectangle a minimum-area box is, growing both sides by twice the distance is the same box)."""
    import cv2

    bitmap = (prob > DET_BINARY).astype(np.uint8) * 255
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    boxes = []
    for contour in contours[:DET_MAX_BOXES]:
        (cx, cy), (bw, bh), angle = cv2.minAreaRect(contour)
        if min(bw, bh) < 3:
            continue
        corners = cv2.boxPoints(((cx, cy), (bw, bh), angle))
        if _box_score(prob, corners) < DET_BOX:
            continue
        grow = bw * bh * DET_UNCLIP / (2 * (bw + bh))
        bw, bh = bw + 2 * grow, bh + 2 * grow
        if min(bw, bh) < 5:
            continue
        corners = cv2.boxPoints(((cx, cy), (bw, bh), angle))
        corners[:, 0] = np.clip(np.round(corners[:, 0] * sx), 0, width - 1)
        corners[:, 1] = np.clip(np.round(corners[:, 1] * sy), 0, height - 1)
        corners = _order(corners)
        if np.linalg.norm(corners[0] - corners[1]) <= 3 or np.linalg.norm(corners[0] - corners[3]) <= 3:
            continue
        boxes.append(corners)
    return np.array(boxes, dtype=np.float32).reshape(-1, 4, 2)


def _box_score(prob: np.ndarray, corners: np.ndarray) -> float:
    import cv2

    h, w = prob.shape
    x0, x1 = int(np.clip(np.floor(corners[:, 0].min()), 0, w - 1)), int(np.clip(np.ceil(corners[:, 0].max()), 0, w - 1))
    y0, y1 = int(np.clip(np.floor(corners[:, 1].min()), 0, h - 1)), int(np.clip(np.ceil(corners[:, 1].max()), 0, h - 1))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    cv2.fillPoly(mask, [(corners - [x0, y0]).astype(np.int32)], 1)
    return float(cv2.mean(prob[y0 : y1 + 1, x0 : x1 + 1], mask)[0])


def _side_lengths(box: np.ndarray) -> tuple[float, float]:
    width = max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3]))
    height = max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2]))
    return float(width), float(height)


def _mostly_upright(boxes: np.ndarray) -> bool:
    """True when most boxes (of more than a character or two) are tall: text running down the page."""
    shapes = [_side_lengths(b) for b in boxes]
    long = [(w, h) for w, h in shapes if max(w, h) >= 2 * min(w, h)]
    return sum(h > w for w, h in long) * 2 > len(long) if long else False


def _rotate_page(bgr: np.ndarray, boxes: np.ndarray, degrees: int) -> tuple[np.ndarray, np.ndarray]:
    """Turn the page counter-clockwise by 90 or 180 degrees, and its boxes with it."""
    h, w = bgr.shape[:2]
    if degrees == 90:
        turned = np.ascontiguousarray(np.rot90(bgr))
        moved = np.stack([boxes[..., 1], (w - 1) - boxes[..., 0]], axis=-1)
    else:
        turned = np.ascontiguousarray(bgr[::-1, ::-1])
        moved = np.stack([(w - 1) - boxes[..., 0], (h - 1) - boxes[..., 1]], axis=-1)
    return turned, np.array([_order(b) for b in moved], dtype=np.float32).reshape(-1, 4, 2)


def _unrotate(corners: np.ndarray, rotation: int, shape: tuple[int, ...]) -> np.ndarray:
    """Corners on the turned page → the frame's pixels (undo `rotation` degrees counter-clockwise)."""
    h, w = shape[:2]  # the turned page's size
    for step in range(rotation // 90):
        del step
        # undo one 90° counter-clockwise turn: (x', y') = (y, W - 1 - x) ⇒ x = W - 1 - y', y = x'
        corners = np.stack([(h - 1) - corners[:, 1], corners[:, 0]], axis=-1)
        h, w = w, h
    return corners


def _crop(bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The box's pixels, straightened by a perspective warp; a box twice as tall as wide is turned to lie."""
    import cv2

    width, height = (max(1, round(s)) for s in _side_lengths(box))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(box.astype(np.float32), target)
    crop = cv2.warpPerspective(bgr, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    if height >= 1.5 * width:
        crop = np.ascontiguousarray(np.rot90(crop))
    return crop


def _rec_input(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """A line crop scaled to `height` (keeping its aspect, at most `width`), normalised to [-1, 1], right-padded."""
    import cv2

    h, w = crop.shape[:2]
    scaled = min(width, max(1, math.ceil(height * w / max(h, 1))))
    resized = cv2.resize(crop, (scaled, height)).astype(np.float32)
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :scaled] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def _bounding_quad(points: np.ndarray) -> np.ndarray:
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


def _join_pieces(boxes: np.ndarray) -> np.ndarray:
    """Join boxes that are pieces of one line (the detector may split a line at a wide gap, and its expanded
    boxes then overlap: "every" + "4 hours" read as "every" + "y 4 hours"). Pieces of a line have about the same
    height, overlap vertically by most of it and are less than a height apart; the joined box is the pieces'
    minimum-area rectangle, so a tilted line stays tilted."""
    import cv2

    groups: list[list[np.ndarray]] = []
    for box in sorted(boxes, key=lambda b: float(b[:, 0].min())):
        top, bottom = float(box[:, 1].min()), float(box[:, 1].max())
        for group in groups:
            last = group[-1]
            t, b = float(last[:, 1].min()), float(last[:, 1].max())
            small, large = sorted((bottom - top, b - t))
            overlap = min(bottom, b) - max(top, t)
            gap = float(box[:, 0].min()) - float(last[:, 0].max())
            if large <= 1.6 * small and overlap >= 0.6 * small and gap <= 0.8 * small:
                group.append(box)
                break
        else:
            groups.append([box])
    joined = [
        group[0] if len(group) == 1 else _order(cv2.boxPoints(cv2.minAreaRect(np.concatenate(group))))
        for group in groups
    ]
    return np.array(joined, dtype=np.float32).reshape(-1, 4, 2)


def _lines(words: list[tuple[np.ndarray, str, float]]) -> list[list[tuple[np.ndarray, str, float]]]:
    """Group word boxes into lines (vertical overlap of half the smaller height), top to bottom, left to right."""
    lines: list[list[tuple[np.ndarray, str, float]]] = []
    spans: list[tuple[float, float]] = []
    for word in sorted(words, key=lambda wd: wd[0][:, 1].mean()):
        top, bottom = float(word[0][:, 1].min()), float(word[0][:, 1].max())
        for i, (t, b) in enumerate(spans):
            overlap = min(b, bottom) - max(t, top)
            if overlap >= 0.5 * min(b - t, bottom - top):
                lines[i].append(word)
                spans[i] = (min(t, top), max(b, bottom))
                break
        else:
            lines.append([word])
            spans.append((top, bottom))
    return [sorted(line, key=lambda wd: wd[0][:, 0].min()) for line in lines]
