"""Contact sheets of scenes with their captions, to look at the world.

The bundled ``lab/dvar_lab/assets/world/samples.png`` is made with::

    python -m dvar_lab.world.preview --out lab/dvar_lab/assets/world/samples.png

Example:
    >>> from dvar_lab.world import render, sample_scenes
    >>> scenes = sample_scenes(4, seed=0)
    >>> images = [render(s, rng=i) for i, s in enumerate(scenes)]
    >>> sheet = contact_sheet(images, [s.caption() for s in scenes], columns=2)
    >>> sheet.size
    (288, 388)
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

from dvar_lab.world.scenes import render, sample_scenes

__all__ = ["contact_sheet"]


def contact_sheet(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    columns: int = 8,
    scale: int = 2,
    caption_lines: int = 5,
    pad: int = 16,
) -> Image.Image:
    """A grid of ``images`` (upscaled ``scale`` times, nearest) with wrapped captions below."""
    if len(images) != len(captions):
        raise ValueError("one caption per image")
    side = images[0].width * scale
    cell_w, line_h = side + pad, 12
    cell_h = side + caption_lines * line_h + 6
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10)
    chars = max(8, int(cell_w / 5.2))
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w + pad // 2, (i // columns) * cell_h
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y + 2))
        for k, line in enumerate(textwrap.wrap(caption, chars)[:caption_lines]):
            draw.text((x - pad // 2 + 2, y + side + 4 + k * line_h), line, fill="black", font=font)
    return sheet


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Save an 8x8 sheet of sample scenes with captions.")
    parser.add_argument("--out", type=Path, default=Path("samples.png"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    scenes = sample_scenes(64, args.seed)
    images = [render(s, rng=(args.seed, i, 1)) for i, s in enumerate(scenes)]
    sheet = contact_sheet(images, [s.caption(template=0) for s in scenes])
    # A 256-colour palette keeps the committed file small; the scenes use few colours anyway.
    sheet.quantize(256, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
