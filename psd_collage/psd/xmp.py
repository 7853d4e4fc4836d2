"""XMP metadata: the File > File Info description, a prompt source."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as _defused_fromstring

from .names import clean_text

_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_DC = "http://purl.org/dc/elements/1.1/"
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def parse_packet(data: bytes | None) -> ET.Element | None:
    """The XMP packet's root element, or None for no, broken or unsafe XMP.

    The file is untrusted: any DTD (and so any entity: billion laughs, external
    entities) is refused by the parser itself, after decoding, so a DOCTYPE hidden in
    UTF-16 is refused like one in UTF-8 (defusedxml; a byte search cannot see it).
    """
    if not data:
        return None
    try:
        return _defused_fromstring(
            data.strip(b"\r\n\t "), forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except (ET.ParseError, DefusedXmlException, ValueError):
        return None


def xmp_description(data: bytes | None) -> str:
    """File > File Info > Description (XMP ``dc:description``), or ``""``."""
    root = parse_packet(data.rstrip(b"\x00") if data else data)
    if root is None:
        return ""
    for desc in root.iter(f"{{{_DC}}}description"):
        items = desc.findall(f".//{{{_RDF}}}li")
        items.sort(key=lambda li: li.get(_XML_LANG) != "x-default")
        texts = ["".join(li.itertext()) for li in items] or ["".join(desc.itertext())]
        for text in texts:
            if text.strip():
                return clean_text(text)
    for node in root.iter(f"{{{_RDF}}}Description"):
        text = node.get(f"{{{_DC}}}description", "")
        if text.strip():
            return clean_text(text)
    return ""
