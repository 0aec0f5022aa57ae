// Uploads for the page: any image the browser reads, as a PNG of the model's size and channels.
"use strict";

// Any image the browser can read, resized to the model's resolution, as a base64 PNG with exactly the
// model's channels (canvas.toDataURL always gives RGBA, which the API refuses for L or RGB models).
async function toModelPNG(file, m) {
  const bitmap = await createImageBitmap(file);
  const canvas = new OffscreenCanvas(m.resolution, m.resolution);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0, m.resolution, m.resolution);
  const rgba = context.getImageData(0, 0, m.resolution, m.resolution).data;
  const pixels = new Uint8Array(rgba.length / 4 * m.channels);
  for (let i = 0, o = 0; i < rgba.length; i += 4) {
    if (m.channels === 1) {
      // Luminance as Pillow's convert("L") computes it.
      pixels[o++] = Math.round(0.299 * rgba[i] + 0.587 * rgba[i + 1] + 0.114 * rgba[i + 2]);
    } else {
      pixels.set(rgba.subarray(i, i + 3), o);
      o += 3;
    }
  }
  const png = await encodePNG(m.resolution, m.resolution, m.channels, pixels);
  let binary = "";
  for (const byte of png) binary += String.fromCharCode(byte);
  return btoa(binary);
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function pngChunk(type, data) {
  const chunk = new Uint8Array(12 + data.length);
  const view = new DataView(chunk.buffer);
  view.setUint32(0, data.length);
  chunk.set(new TextEncoder().encode(type), 4);
  chunk.set(data, 8);
  let crc = 0xffffffff;
  for (const byte of chunk.subarray(4, 8 + data.length)) crc = CRC_TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  view.setUint32(8 + data.length, (crc ^ 0xffffffff) >>> 0);
  return chunk;
}

// An 8-bit grayscale (1 channel) or RGB (3) PNG; zlib compression by the browser's CompressionStream.
async function encodePNG(width, height, channels, pixels) {
  const stride = width * channels;
  const rows = new Uint8Array(height * (stride + 1)); // each row: filter type 0, then its bytes
  for (let y = 0; y < height; y++) {
    rows.set(pixels.subarray(y * stride, (y + 1) * stride), y * (stride + 1) + 1);
  }
  const zlib = new Response(new Blob([rows]).stream().pipeThrough(new CompressionStream("deflate")));
  const header = new Uint8Array(13);
  new DataView(header.buffer).setUint32(0, width);
  new DataView(header.buffer).setUint32(4, height);
  header.set([8, channels === 1 ? 0 : 2, 0, 0, 0], 8);
  const parts = [
    new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]),
    pngChunk("IHDR", header),
    pngChunk("IDAT", new Uint8Array(await zlib.arrayBuffer())),
    pngChunk("IEND", new Uint8Array()),
  ];
  return new Uint8Array(await new Blob(parts).arrayBuffer());
}
