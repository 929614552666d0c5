"""Title-card thumbnails for the templates in workflows/ (a script; not part of the package).

ComfyUI's frontend shows an image with the workflow's base name beside each template (it asks for `NAME.jpg`
for custom-node templates, frontend 1.49); `app/custom_node_manager.py` serves the workflows/ folder as static
files. `tests/test_nodes_polish.py` checks every workflow has one.

    python -m tools.thumbnails          # redraw workflows/*.jpg
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

WORKFLOWS = Path(__file__).absolute().parents[1] / "workflows"
THUMBNAILS = {
    "pyramid_flow_t2v_384p": ("Text to video", "384p", "5 s at 24 fps from a prompt (121 frames, 640x384)"),
    "pyramid_flow_i2v_384p": ("Image to video", "384p", "animates a start image: 5 s at 24 fps"),
    "pyramid_flow_t2v_384p_extend": ("Text to video, 10 s", "384p",
                                     "a 5 s clip, then continued for 5 s more with a new prompt"),
    "pyramid_flow_t2v_384p_upscale": ("Text to video,\nupscaled x2", "384p",
                                      "then ComfyUI's ImageScaleBy (lanczos x2) before saving"),
    "pyramid_flow_t2v_768p_low_vram": ("Text to video,\nlow VRAM", "768p",
                                       "5 s for 8-12 GB cards: the DiT streams through a 6 GB budget"),
}
THUMBNAIL_SIZE = (512, 512)
THUMBNAIL_BYTES = 50_000


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu"):
        if Path(folder, name).exists():
            return ImageFont.truetype(str(Path(folder, name)), size)
    return ImageFont.load_default(size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def draw_thumbnail(title: str, resolution: str, what: str) -> Image.Image:
    """A title card: dark gradient, the three pyramid stages as a motif, the workflow's name and what it does."""
    from PIL import ImageDraw

    width, height = THUMBNAIL_SIZE
    y = torch.linspace(0, 1, height).view(-1, 1, 1)
    x = torch.linspace(0, 1, width).view(1, -1, 1)
    top, bottom = torch.tensor([22.0, 28, 58]), torch.tensor([58.0, 24, 70])
    pixels = top + (bottom - top) * (0.7 * y + 0.3 * x)
    image = Image.fromarray(pixels.round().to(torch.uint8).numpy(), "RGB")
    draw = ImageDraw.Draw(image)
    for stage, (w, shade) in enumerate(((92, (255, 196, 90)), (184, (247, 142, 86)), (276, (226, 92, 110)))):
        top_y = 70 + stage * 38  # three pyramid stages: 1/4, 1/2, full size
        draw.rounded_rectangle(((width - w) // 2, top_y, (width + w) // 2, top_y + 30), radius=6, fill=shade)
    draw.text((width // 2, 222), "PYRAMID FLOW", font=_font(22, bold=True), fill=(200, 205, 230), anchor="mm")
    lines = [line for part in title.split("\n") for line in _wrap(draw, part, _font(40, bold=True), width - 60)]
    for i, line in enumerate(lines):
        draw.text((width // 2, 272 + 46 * i), line, font=_font(40, bold=True), fill=(255, 255, 255), anchor="mm")
    at = 272 + 46 * len(lines) + 6
    draw.rounded_rectangle((width // 2 - 44, at, width // 2 + 44, at + 34), radius=17, outline=(255, 196, 90), width=2)
    draw.text((width // 2, at + 17), resolution, font=_font(20, bold=True), fill=(255, 196, 90), anchor="mm")
    for i, line in enumerate(_wrap(draw, what, _font(22), width - 80)):
        draw.text((width // 2, at + 64 + 30 * i), line, font=_font(22), fill=(220, 222, 235), anchor="mm")
    return image


def write_thumbnails() -> None:
    for name, card in THUMBNAILS.items():
        draw_thumbnail(*card).save(WORKFLOWS / f"{name}.jpg", "JPEG", quality=85, optimize=True, progressive=True)


def main(argv: list[str] | None = None) -> None:
    if (argv if argv is not None else sys.argv[1:]):
        raise SystemExit("usage: python -m tools.thumbnails")
    write_thumbnails()
    print("\n".join(f"{p.name}: {p.stat().st_size} bytes" for p in sorted(WORKFLOWS.glob("*.jpg"))))


if __name__ == "__main__":
    main()
