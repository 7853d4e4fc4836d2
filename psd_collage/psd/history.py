"""Each render's settings, kept in the document's XMP so that Photoshop carries them along.

Photoshop keeps the document XMP packet (File > File Info) across saves, unknown
namespaces included. Every render adds one entry to ``psdcollage:renders``, keyed
by the name of the ``[harmonized]`` group it wrote: the model and a hash of its
weights, the prompts, each variant's seed, the sampler settings and, per layer,
its id, box, noise and weights. ``render --like`` reproduces a variant from it and
a later ``[redo]`` learns from it where each layer was.

The settings of one render are a JSON object in one XMP text property: XMP has no
number or map types worth the trouble, and JSON round-trips exactly.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .xmp import parse_packet

NAMESPACE = "https://github.com/psd-collage/psd-collage/ns/1.0/"
PREFIX = "psdcollage"
_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_X = "adobe:ns:meta/"
# Prefixes Photoshop writes, so a rewritten packet keeps its familiar spelling.
_KNOWN_PREFIXES = {
    "x": _X,
    "rdf": _RDF,
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "stEvt": "http://ns.adobe.com/xap/1.0/sType/ResourceEvent#",
    "stRef": "http://ns.adobe.com/xap/1.0/sType/ResourceRef#",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "xmpRights": "http://ns.adobe.com/xap/1.0/rights/",
    PREFIX: NAMESPACE,
}
for _prefix, _uri in _KNOWN_PREFIXES.items():
    ET.register_namespace(_prefix, _uri)

_PACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
_PACKET_END = '\n<?xpacket end="w"?>'


def _parse(data: bytes | None) -> ET.Element | None:
    """The ``x:xmpmeta`` (or bare ``rdf:RDF``) root, or None for no/unsafe/broken XMP."""
    return parse_packet(data.rstrip(b"\x00") if data else data)


def read_renders(data: bytes | None) -> dict[str, dict[str, Any]]:
    """Group name -> the settings of the render that wrote it, oldest first."""
    root = _parse(data)
    if root is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for item in root.iterfind(f".//{{{NAMESPACE}}}renders/{{{_RDF}}}Seq/{{{_RDF}}}li"):
        try:
            record = json.loads(item.text or "")
        except ValueError:
            continue  # edited by hand beyond repair: that render is just not known
        if isinstance(record, dict) and isinstance(record.get("group"), str):
            out[record["group"]] = record
    return out


def add_render(data: bytes | None, record: dict[str, Any]) -> bytes:
    """The XMP packet ``data`` (or a new one) with ``record`` appended to the renders.

    The renders are an ordered XMP array (``rdf:Seq``) of text items, one JSON
    object each.

    Everything else in the packet (File Info, Photoshop's history) is kept.
    """
    if not isinstance(record.get("group"), str):
        raise ValueError("a render record needs its group name")
    root = _parse(data)
    if root is None:
        root = ET.Element(f"{{{_X}}}xmpmeta")
    rdf = root if root.tag == f"{{{_RDF}}}RDF" else root.find(f"{{{_RDF}}}RDF")
    if rdf is None:
        rdf = ET.SubElement(root, f"{{{_RDF}}}RDF")
    renders = rdf.find(f"{{{_RDF}}}Description/{{{NAMESPACE}}}renders/{{{_RDF}}}Seq")
    if renders is None:
        description = ET.SubElement(rdf, f"{{{_RDF}}}Description", {f"{{{_RDF}}}about": ""})
        renders = ET.SubElement(
            ET.SubElement(description, f"{{{NAMESPACE}}}renders"), f"{{{_RDF}}}Seq"
        )
    item = ET.SubElement(renders, f"{{{_RDF}}}li")
    item.text = json.dumps(record, ensure_ascii=False, sort_keys=True, allow_nan=False)
    body = ET.tostring(root, encoding="unicode")
    return (_PACKET_BEGIN + body + _PACKET_END).encode("utf-8")


def read_renders_from_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """:func:`read_renders` of a PSD/PSB's XMP, reading only the image resources section.

    Cheap enough to run before the document itself is read (``render --like``).
    Anything unreadable gives ``{}``: the reader reports a damaged file properly.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
            if len(head) < 26 or head[:4] != b"8BPS":
                return {}
            fh.seek(int.from_bytes(fh.read(4), "big"), 1)  # colour mode data
            size = int.from_bytes(fh.read(4), "big")
            section = fh.read(size)
    except OSError:
        return {}
    return read_renders(_resource(section, _XMP_RESOURCE))


_XMP_RESOURCE = 1060


def _resource(section: bytes, wanted: int) -> bytes | None:
    """One image resource's data: ``8BIM``, id, padded Pascal name, size, padded data."""
    offset = 0
    while offset + 12 <= len(section):
        if section[offset : offset + 4] != b"8BIM":
            return None
        key = int.from_bytes(section[offset + 4 : offset + 6], "big")
        name_length = section[offset + 6]
        offset += 6 + ((name_length + 2) & ~1)
        size = int.from_bytes(section[offset : offset + 4], "big")
        offset += 4
        if key == wanted:
            return section[offset : offset + size]
        offset += (size + 1) & ~1
    return None


def find_variant(renders: dict[str, dict[str, Any]], like: str) -> tuple[dict[str, Any], int]:
    """``"GROUP/seed N"`` -> (that render's record, the variant's seed); KeyError says why."""
    group, _, layer = like.rpartition("/")
    group, layer = group.strip(), layer.strip()
    record = renders.get(group)
    if record is None:
        known = "; ".join(repr(name) for name in renders) or "none"
        raise KeyError(f"no recorded render for group {group!r} (recorded: {known})")
    for variant in record.get("variants", []):
        if variant.get("layer") == layer or (layer.isdigit() and variant.get("seed") == int(layer)):
            return record, int(variant["seed"])
    names = ", ".join(repr(v.get("layer")) for v in record.get("variants", []))
    raise KeyError(f"group {group!r} has no variant {layer!r} (its variants: {names})")
