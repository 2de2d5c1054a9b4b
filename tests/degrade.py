"""Real pictures of a seal's badge: rendered by rsvg-convert, then degraded as phones, scanners and screenshots degrade them.

Shared by tests/test_pictures.py (every picture is read by ZXing-C++, by the portal in Chromium and by gbx verify) and
bench/pictures.py (the portal's decode time of a 1600x1200 photo). Each degradation is deterministic: the same badge
always gives the same bytes.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from collections.abc import Callable

from PIL import Image, ImageChops, ImageDraw, ImageFilter

RSVG = "/usr/bin/rsvg-convert"
DESK = (118, 96, 74)  # a wooden desk
GREY_TABLE = (150, 150, 150)


def render(svg: bytes, width: int) -> Image.Image:
    """The badge rasterised by librsvg (Debian's rsvg-convert), `width` px wide, on white."""
    rsvg = shutil.which("rsvg-convert") or RSVG
    png = subprocess.run([rsvg, "-w", str(width), "-b", "white"], input=svg, capture_output=True, check=True, timeout=60).stdout
    return Image.open(io.BytesIO(png)).convert("RGB")


def encoded(image: Image.Image, kind: str, **options: int) -> bytes:
    """The picture as the bytes of a PNG, JPEG or WebP file."""
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def jpeg(image: Image.Image, quality: int) -> bytes:
    """A JPEG of the picture at `quality` (4:2:0 chroma subsampling, as cameras save them)."""
    return encoded(image.convert("RGB"), "JPEG", quality=quality)


def rotated(svg: bytes, degrees: float) -> bytes:
    """A print photographed turned by `degrees` on a grey table, 1000 px wide, JPEG quality 60 (the photo jsQR missed)."""
    badge = render(svg, 1000)
    return jpeg(badge.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=GREY_TABLE), 60)


def perspective(svg: bytes) -> bytes:
    """A phone held at an angle over a print: the far edge shrinks to 70 % and shifts, as a camera tilted ~35 degrees sees it."""
    badge = render(svg, 1000)
    width, height = badge.size
    canvas = Image.new("RGB", (width + 200, height + 200), DESK)
    canvas.paste(badge, (100, 100))
    # Corners of the badge in the photo: the top edge is farther from the lens.
    source = [(100, 100), (100 + width, 100), (100 + width, 100 + height), (100, 100 + height)]
    target = [(250, 180), (960, 140), (1150, height + 170), (40, height + 110)]
    coefficients = _perspective_coefficients(target, source)
    photo = canvas.transform(canvas.size, Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BICUBIC, fillcolor=DESK)
    return jpeg(photo, 80)


def _perspective_coefficients(target: list[tuple[float, float]], source: list[tuple[float, float]]) -> list[float]:
    """Pillow's eight perspective coefficients mapping each output corner (target) back to its input corner (source)."""
    rows: list[list[float]] = []
    values: list[float] = []
    for (x, y), (u, v) in zip(target, source, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        values.extend((u, v))
    return _solve(rows, values)


def _solve(rows: list[list[float]], values: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (8x8: no numpy needed)."""
    size = len(values)
    matrix = [row[:] + [value] for row, value in zip(rows, values, strict=True)]
    for column in range(size):
        pivot = max(range(column, size), key=lambda r: abs(matrix[r][column]))
        matrix[column], matrix[pivot] = matrix[pivot], matrix[column]
        for row in range(size):
            if row != column:
                factor = matrix[row][column] / matrix[column][column]
                matrix[row] = [a - factor * b for a, b in zip(matrix[row], matrix[column], strict=True)]
    return [matrix[row][size] / matrix[row][row] for row in range(size)]


def blurred(svg: bytes) -> bytes:
    """An out-of-focus photo: Gaussian blur of radius 1.5 px (half a QR module) on a 1000 px badge, JPEG quality 85."""
    return jpeg(render(svg, 1000).filter(ImageFilter.GaussianBlur(1.5)), 85)


def uneven_light(svg: bytes) -> bytes:
    """A print under a desk lamp: full light on the left falling to 45 % on the right, and the soft shadow of a hand."""
    badge = render(svg, 1000)
    width, height = badge.size
    light = Image.linear_gradient("L").rotate(90).resize((width, height))  # 0 on the left, 255 on the right
    light = light.point(lambda value: 255 - value * 140 // 255)
    shadow = Image.new("L", (width, height), 255)
    ImageDraw.Draw(shadow).ellipse((width * 0.6, -height * 0.4, width * 1.4, height * 0.5), fill=150)
    light = ImageChops.multiply(light, shadow.filter(ImageFilter.GaussianBlur(50)))
    return jpeg(ImageChops.multiply(badge, Image.merge("RGB", (light, light, light))), 85)


def low_quality_jpeg(svg: bytes) -> bytes:
    """A screenshot saved at JPEG quality 50, 900 px wide."""
    return jpeg(render(svg, 900), 50)


def on_a_desk(svg: bytes) -> bytes:
    """A print lying on a desk, filling 60 % of a 1600x1200 phone photo's width, turned 4 degrees, with a little noise."""
    return jpeg(desk_photo(svg), 85)


def desk_photo(svg: bytes) -> Image.Image:
    """The 1600x1200 photo of a print on a desk (before it is saved): the badge 960 px wide, turned 4 degrees."""
    badge = render(svg, 960).convert("RGBA").rotate(4, resample=Image.Resampling.BICUBIC, expand=True)
    desk = empty_desk((1600, 1200))
    desk.paste(badge, ((1600 - badge.width) // 2, (1200 - badge.height) // 2), badge)
    return desk.filter(ImageFilter.GaussianBlur(0.6))


def empty_desk(size: tuple[int, int]) -> Image.Image:
    """A desk's surface: its colour with a fixed grain of noise (seeded, so every run draws the same)."""
    grain = Image.frombytes("L", size, random.Random(7).randbytes(size[0] * size[1])).filter(ImageFilter.GaussianBlur(1))
    return Image.blend(Image.new("RGB", size, DESK), grain.convert("RGB"), 0.15)


def greyscale_scan(svg: bytes) -> bytes:
    """A low-resolution greyscale scan: the badge at 100 dpi (about 700 px wide), 8-bit grey PNG, slightly skewed."""
    scan = render(svg, 700).convert("L").rotate(1.5, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=245)
    return encoded(scan, "PNG")


def phone_screenshot(svg: bytes) -> bytes:
    """A 480 px wide phone screenshot of the badge shown in a page, as WebP (a chat app's format)."""
    screen = Image.new("RGB", (480, 900), (246, 248, 250))
    badge = render(svg, 460)
    screen.paste(badge, (10, 120))
    return encoded(screen, "WEBP", quality=80)


def upside_down(svg: bytes) -> bytes:
    """A print photographed upside down (turned 180 degrees), 1000 px wide."""
    return jpeg(render(svg, 1000).rotate(180), 80)


# Every degradation the portal and gbx must read: name -> (file name, bytes from the badge's svg).
DEGRADATIONS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "rotated 8 degrees": ("rotated-8.jpg", lambda svg: rotated(svg, 8)),
    "rotated 15 degrees": ("rotated-15.jpg", lambda svg: rotated(svg, 15)),
    "upside down": ("upside-down.jpg", upside_down),
    "phone at an angle": ("perspective.jpg", perspective),
    "gaussian blur": ("blurred.jpg", blurred),
    "uneven lighting": ("uneven-light.jpg", uneven_light),
    "jpeg quality 50": ("quality-50.jpg", low_quality_jpeg),
    "print on a desk, 1600x1200": ("desk.jpg", on_a_desk),
    "low-resolution greyscale scan": ("scan.png", greyscale_scan),
    "480 px phone screenshot": ("screenshot.webp", phone_screenshot),
}
