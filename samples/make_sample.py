"""Build ``samples/picnic.psd``: a small layered collage to try psd-collage on.

Run from the repository root::

    python samples/make_sample.py            # writes samples/picnic.psd

The pictures are public-domain / CC0 photos shipped with scikit-image (see
samples/README.md); the cut-outs are soft ellipses or a brightness threshold.
Every object layer has real transparency (a 4-channel layer, not a layer mask:
psd-tools turns the alpha of an RGBA image added with ``frompil`` into a layer
mask, so layers are built from arrays). The prompt lives in File Info >
Description (XMP ``dc:description``) because psd-tools cannot write text layers.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageCms, ImageDraw, ImageFilter
from psd_tools import PSDImage
from psd_tools.constants import Compression, Resource
from psd_tools.psd.image_resources import ImageResource
from skimage import data

WIDTH, HEIGHT = 768, 512
HORIZON = 200
# Every caption appears word for word, so the engine steers them without appending any.
PROMPT = (
    "a tabby cat and a cup of espresso on a saucer on a red and white checkered picnic "
    "blanket, sunny park lawn under a blue sky, a rocket launching in the distance, photo"
)
OUTPUT = Path(__file__).resolve().parent / "picnic.psd"


def lawn() -> np.ndarray:
    """Sky gradient over a green-tinted grass texture, (H, W, 3) uint8."""
    out = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    t = np.linspace(0.0, 1.0, HORIZON, dtype=np.float32)[:, None]
    top, bottom = np.array([70, 130, 210], np.float32), np.array([185, 215, 240], np.float32)
    out[:HORIZON] = (top * (1 - t) + bottom * t)[:, None, :]
    grass = Image.fromarray(data.grass()).resize((WIDTH, WIDTH), Image.Resampling.LANCZOS)
    texture = np.asarray(grass, np.float32)[: HEIGHT - HORIZON] / 255.0
    depth = np.linspace(0.75, 1.1, HEIGHT - HORIZON, dtype=np.float32)[:, None]
    green = np.array([70, 140, 45], np.float32)
    out[HORIZON:] = green * (0.55 + 0.6 * texture[..., None]) * depth[..., None]
    band = slice(HORIZON - 6, HORIZON + 6)  # a soft horizon
    out[band] = Image.fromarray(np.clip(out[band], 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(3)
    )
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def soft_ellipse(width: int, height: int, feather: float) -> np.ndarray:
    """An elliptical alpha (h, w) uint8 with a soft edge of ``feather`` px."""
    mask = Image.new("L", (width, height), 0)
    inset = int(feather)
    ImageDraw.Draw(mask).ellipse((inset, inset, width - inset - 1, height - inset - 1), fill=255)
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(feather / 2)))


def cut(photo: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop ``box`` from ``photo``, resize to ``size`` and give it a soft elliptical alpha."""
    crop = Image.fromarray(photo).crop(box).resize(size, Image.Resampling.LANCZOS)
    alpha = soft_ellipse(*size, feather=max(4.0, min(size) / 14))
    return np.dstack([np.asarray(crop), alpha])


def rocket(height: int) -> np.ndarray:
    """The Falcon 9 cut out of its night sky by brightness, (h, w, 4) uint8."""
    box = (296, 120, 348, 400)
    crop = Image.fromarray(data.rocket()).crop(box)
    width = round(height * (box[2] - box[0]) / (box[3] - box[1]))
    rgb = np.asarray(crop.resize((width, height), Image.Resampling.LANCZOS))
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    alpha = np.clip((luma - 70.0) * 4.0, 0, 255).astype(np.uint8)
    alpha = np.asarray(Image.fromarray(alpha).filter(ImageFilter.GaussianBlur(0.8)))
    return np.dstack([rgb, alpha])


def blanket() -> tuple[np.ndarray, tuple[int, int]]:
    """A red/white checkered blanket seen in perspective: a trapezoid, (h, w, 4) and offset."""
    left, top, right, bottom = 60, 290, 710, 500
    width, height = right - left, bottom - top
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = ys / (height - 1)  # 0 at the far edge, 1 at the near edge
    inset = (1.0 - t) * 90.0  # the far edge is shorter
    u = (xs - inset) / np.maximum(width - 2 * inset, 1)  # 0..1 across
    v = t**1.3  # rows get taller towards the viewer
    checks = (np.floor(u * 12) + np.floor(v * 7)) % 2
    red, white = np.array([200, 30, 40], np.float32), np.array([245, 240, 230], np.float32)
    shade = (0.8 + 0.2 * t)[..., None]
    rgb = np.where(checks[..., None] > 0, red, white) * shade
    inside = (xs >= inset) & (xs <= width - 1 - inset)
    alpha = Image.fromarray((inside * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    rgba = np.dstack([np.clip(rgb + 0.5, 0, 255).astype(np.uint8), np.asarray(alpha)])
    return rgba, (left, top)


def xmp_packet(description: str) -> bytes:
    """A minimal XMP packet holding File Info > Description."""
    text = escape(description)
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">\n'
        "   <dc:format>application/vnd.adobe.photoshop</dc:format>\n"
        "   <dc:description><rdf:Alt>"
        f'<rdf:li xml:lang="x-default">{text}</rdf:li>'
        "</rdf:Alt></dc:description>\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()


def srgb_profile() -> bytes:
    """Little CMS's sRGB profile, with its creation date fixed so the build is reproducible."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    data[24:36] = (2024).to_bytes(2, "big") + bytes([0, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    return bytes(data)  # bytes 84..99 (profile ID) are zero: no checksum to update


def build(path: Path) -> Path:
    psd = PSDImage.new("RGB", (WIDTH, HEIGHT), color=(255, 255, 255))
    layers: list[tuple[str, np.ndarray, tuple[int, int]]] = [
        ("sunny park lawn under a blue sky", np.dstack([lawn(), np.full((HEIGHT, WIDTH), 255, np.uint8)]), (0, 0)),
        ("a rocket launching in the distance", rocket(230), (600, 12)),
        ("red and white checkered picnic blanket [lock]", *blanket()),
        ("a tabby cat [noise=0.3]", cut(data.chelsea(), (40, 0, 410, 300), (240, 195)), (150, 230)),
        ("a cup of espresso on a saucer", cut(data.coffee(), (70, 60, 490, 395), (210, 168)), (440, 318)),
    ]  # fmt: skip
    for name, rgba, (left, top) in layers:  # back to front
        psd.create_pixel_layer_from_array(
            rgba, name=name, left=left, top=top, compression=Compression.ZIP
        )
    resources = psd.image_resources
    resources[Resource.XMP_METADATA] = ImageResource(
        key=Resource.XMP_METADATA, data=xmp_packet(PROMPT)
    )
    resources[Resource.ICC_PROFILE] = ImageResource(key=Resource.ICC_PROFILE, data=srgb_profile())
    buffer = io.BytesIO()
    psd.save(buffer)  # psd-tools composites the merged image here
    path.write_bytes(buffer.getvalue())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=OUTPUT)
    args = parser.parse_args()
    out = build(args.output)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
