"""Pictures for people: training curves (matplotlib) and detections drawn on an image (PIL)."""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence, Tuple


def plot_curves(panels: Mapping[str, Mapping[str, Sequence[Tuple[int, float]]]]):
    """One panel per title, one line per series against the optimizer step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(panels), 4), dpi=100)
    for index, (title, series) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for name, points in sorted(series.items()):
            points = sorted(points)
            axes.plot([s for s, _ in points], [v for _, v in points], label=name,
                      marker="." if len(points) < 20 else None)
        axes.set_xlabel("optimizer step")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if 1 < len(series) <= 12:
            axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


# Distinct, saturated colours (one per class id, cycled): a class keeps its colour across images.
_BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


def draw_detections(image, boxes: Iterable, labels: Iterable, scores: Iterable, names: Mapping[int, str],
                    min_side: int = 480):
    """Boxes (x0, y0, x1, y1 pixels of ``image``) drawn on a copy of a PIL image, labelled 'name 0.87'.

    One colour per class, the label on a filled tab above its box (inside the picture when the box
    touches the top edge), the highest score drawn last so it stays on top. A picture whose short
    side is below ``min_side`` is enlarged by a whole factor first (boxes scaled with it) so that
    small inputs (the synthetic demo's 160x120) stay legible; the returned image is that size.
    """
    from PIL import Image, ImageDraw, ImageFont

    canvas = image.convert("RGB")  # a new image: the caller's stays untouched
    factor = max(1, math.ceil(min_side / max(1, min(canvas.size))))
    if factor > 1:
        canvas = canvas.resize((canvas.size[0] * factor, canvas.size[1] * factor), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(11, min(canvas.size) // 32))
    width = max(2, min(canvas.size) // 200)
    entries = sorted(zip(boxes, labels, scores), key=lambda e: float(e[2]))
    for box, label, score in entries:
        x0, y0, x1, y1 = (float(v) * factor for v in box)
        colour = _BOX_COLOURS[int(label) % len(_BOX_COLOURS)]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{names.get(int(label), int(label))} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tab_w, tab_h = right - left + 4, bottom - top + 4
        tx, ty = min(max(0.0, x0), max(0.0, canvas.size[0] - tab_w)), y0 - tab_h
        if ty < 0:
            ty = max(0.0, y0)
        draw.rectangle([tx, ty, tx + tab_w, ty + tab_h], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 2 - left, ty + 2 - top), text, font=font,
                  fill=(0, 0, 0) if luminance > 140 else (255, 255, 255))
    return canvas
