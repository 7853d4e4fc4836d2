// Reads a PSD/PSB with ag-psd (independent of psd-tools) and prints JSON:
// document header, the XMP packet, the layer tree (names, visibility, bounds) and, for small
// documents, each layer's and the composite's RGBA pixels as base64.
// Usage: node read_psd.mjs FILE.psd
import { readFileSync } from "node:fs";
import { initializeCanvas, readPsd } from "ag-psd";

// No canvas in node: plain RGBA buffers are all we read (useImageData).
const imageData = (width, height) => ({ width, height, data: new Uint8ClampedArray(width * height * 4) });
initializeCanvas(() => {
  throw new Error("no canvas in tests");
}, imageData);

const buffer = readFileSync(process.argv[2]);
const psd = readPsd(buffer, { useImageData: true, throwForMissingFeatures: false });

// ag-psd keeps a 16/32-bit composite at its depth but gives layers 8 bits (the high byte).
const pixels = (image) =>
  image
    ? {
        bits: 8 * image.data.BYTES_PER_ELEMENT,
        data: Buffer.from(image.data.buffer, image.data.byteOffset, image.data.byteLength).toString("base64"),
      }
    : null;

const layer = (node) => ({
  name: node.name,
  hidden: Boolean(node.hidden),
  left: node.left ?? 0,
  top: node.top ?? 0,
  right: node.right ?? 0,
  bottom: node.bottom ?? 0,
  group: Array.isArray(node.children),
  pixels: pixels(node.imageData),
  children: (node.children ?? []).map(layer),
});

console.log(
  JSON.stringify({
    width: psd.width,
    height: psd.height,
    bitsPerChannel: psd.bitsPerChannel,
    colorMode: psd.colorMode,
    channels: psd.channels,
    composite: pixels(psd.imageData),
    xmp: psd.imageResources?.xmpMetadata ?? null,
    children: (psd.children ?? []).map(layer),
  }),
);
