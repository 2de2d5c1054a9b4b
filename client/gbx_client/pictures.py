"""A seal given as a picture of its badge (PNG, JPEG, WebP): the verification link its one QR code holds, read with zxing-cpp.

zxing-cpp (ZXing-C++, the decoder the portal runs as WebAssembly) and Pillow come with the `pictures` extra, so a
runner that never reads pictures does not install them; without them, reading a picture is a usage error (exit 2)
that names the extra.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from gbx_client.errors import UsageError
from gbx_client.seal_format import SealDocumentInvalid, parse_verify_link
from gbx_client.verify import SealFiles

if TYPE_CHECKING:
    from PIL import Image

INSTALL_EXTRA = "pip install 'gbx-client[pictures]'"
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
PICTURE_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
# The same sentences as the portal's (portal/app.js), for the same pictures.
NO_CODE = "no QR code found in the picture"
SEVERAL_CODES = "the picture holds more than one QR code"
NOT_A_LINK = "the picture's QR code is not a seal verification link (BASE/v#P.S)"


def is_picture(path: Path) -> bool:
    """Whether a SEAL argument names a picture: a .png, .jpg, .jpeg or .webp file, or a file that starts like one."""
    if path.is_dir():
        return False
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return True
    try:
        with path.open("rb") as file:
            head = file.read(12)
    except OSError:
        return False  # nothing readable: load_seal reports it
    return head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


class PictureUnreadable(ValueError):
    """The file is not a PNG, JPEG or WebP picture that decodes; the message says why."""


def picture_seal(path: Path) -> SealFiles:
    """The seal a picture's one QR code links to; a picture without exactly one code, or not a link, is unreadable."""
    try:
        texts = read_qr_codes(path)
    except PictureUnreadable as exc:
        return SealFiles(source=path, svg=b"", unreadable=str(exc))
    if not texts:
        return SealFiles(source=path, svg=b"", unreadable=NO_CODE)
    if len(texts) > 1:
        return SealFiles(source=path, svg=b"", unreadable=SEVERAL_CODES)
    try:
        parse_verify_link(texts[0])
    except SealDocumentInvalid:
        return SealFiles(source=path, svg=b"", unreadable=NOT_A_LINK)
    return SealFiles(source=path, svg=b"", link=texts[0])


def read_qr_codes(path: Path) -> list[str]:
    """The texts of the QR codes in a picture, as the portal reads them (plain text, transparency on white).

    UsageError when the pictures extra is missing or the file cannot be read; PictureUnreadable when it is no picture.
    """
    try:
        import zxingcpp
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise UsageError(f"{path} is a picture: reading its QR code needs zxing-cpp and Pillow, the pictures extra ({INSTALL_EXTRA})") from exc
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the picture {path}: {exc.strerror or exc}") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            pixels = _grey_on_white(image) if kind in PICTURE_FORMATS else None
    except UnidentifiedImageError as exc:
        raise PictureUnreadable("the picture could not be read (not a PNG, JPEG or WebP image)") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PictureUnreadable(f"the picture could not be read ({exc or type(exc).__name__})") from exc
    if pixels is None:
        raise PictureUnreadable(f"the picture could not be read (a {kind} image, not PNG, JPEG or WebP)")
    found = zxingcpp.read_barcodes(pixels, formats=zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode), text_mode=zxingcpp.TextMode.Plain)
    return [code.text for code in found]


def _grey_on_white(image: Image.Image) -> Image.Image:
    """8-bit grey pixels, a transparent background read as white paper (as the portal draws it on a white canvas)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("L")
    return image.convert("L")
