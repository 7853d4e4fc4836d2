"""XMP metadata: the File > File Info description, a prompt source."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from .names import clean_text

_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_DC = "http://purl.org/dc/elements/1.1/"
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def xmp_description(data: bytes | None) -> str:
    """File > File Info > Description (XMP ``dc:description``), or ``""``."""
    if not data or b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        return ""  # no entity expansion from an untrusted file
    try:
        root = ET.fromstring(data.strip(b"\x00\r\n\t "))
    except ET.ParseError:
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
