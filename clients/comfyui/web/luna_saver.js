// Luna Saver's frontend extension: dropping or opening a JPEG, EXR or WebP file that carries a
// ComfyUI workflow loads that workflow, as ComfyUI does for its own PNGs.
//
// Why: no stock frontend reads JPEG or EXR metadata at all, and frontends before the RIFF padding
// fix (1.27.x among them) miss the EXIF of a WebP after an odd-length image chunk. Where the
// metadata is, in Luna Saver's files (libs/imaging):
// - JPEG: APP1 "Exif\0\0" + TIFF, IFD0 ASCII entries "prompt:<json>" (Model), "workflow:<json>"
//   (Make) and further "<key>:<value>" entries; ComfyUI's own scheme, so any tag may hold a key.
// - WebP: the same TIFF data in the RIFF "EXIF" chunk.
// - EXR: header attributes of type "string" named "workflow" and "prompt" (like PNG text chunks).
// Files without a workflow or prompt, and any file that fails to parse, go to the frontend's own
// handling unchanged. Only the bytes needed are read (File.slice), so large EXR files are cheap.
import { app } from "../../scripts/app.js";

const EXR_MAGIC = [0x76, 0x2f, 0x31, 0x01];
const utf8 = new TextDecoder("utf-8");

async function bytes(file, start, length) {
  return new Uint8Array(await file.slice(start, start + length).arrayBuffer());
}

function startsWith(data, magic) {
  return magic.every((b, i) => data[i] === b);
}

// "key:value" pairs of the ASCII entries of IFD0 in TIFF data (either byte order).
function tiffEntries(tiff) {
  const view = new DataView(tiff.buffer, tiff.byteOffset, tiff.byteLength);
  const little = tiff[0] === 0x49 && tiff[1] === 0x49; // "II"
  if (!little && !(tiff[0] === 0x4d && tiff[1] === 0x4d)) return {};
  const ifd = view.getUint32(4, little);
  const count = view.getUint16(ifd, little);
  const entries = {};
  for (let i = 0; i < count; i++) {
    const entry = ifd + 2 + 12 * i;
    if (view.getUint16(entry + 2, little) !== 2) continue; // ASCII only
    const length = view.getUint32(entry + 4, little);
    const at = length <= 4 ? entry + 8 : view.getUint32(entry + 8, little);
    const text = utf8.decode(tiff.subarray(at, at + length)).replace(/\0+$/, "");
    const colon = text.indexOf(":");
    if (colon > 0) entries[text.slice(0, colon).toLowerCase()] = text.slice(colon + 1);
  }
  return entries;
}

function exifEntries(payload) {
  const exif = [0x45, 0x78, 0x69, 0x66, 0, 0]; // "Exif\0\0"
  return tiffEntries(startsWith(payload, exif) ? payload.subarray(6) : payload);
}

// JPEG: walk the segments before the image data for an APP1 holding EXIF.
async function jpegEntries(file) {
  let offset = 2;
  while (offset + 4 <= file.size) {
    const [mark, kind, hi, lo] = await bytes(file, offset, 4);
    if (mark !== 0xff || kind === 0xda || kind === 0xd9) break; // start of scan, end of image
    const length = (hi << 8) | lo; // includes its own two bytes
    if (kind === 0xe1) {
      const entries = exifEntries(await bytes(file, offset + 4, length - 2));
      if (entries.workflow || entries.prompt) return entries;
    }
    offset += 2 + length;
  }
  return {};
}

// WebP: walk the RIFF chunks (each padded to an even length) for the EXIF chunk.
async function webpEntries(file) {
  let offset = 12;
  while (offset + 8 <= file.size) {
    const header = await bytes(file, offset, 8);
    const length = new DataView(header.buffer).getUint32(4, true);
    if (utf8.decode(header.subarray(0, 4)) === "EXIF") {
      return exifEntries(await bytes(file, offset + 8, length));
    }
    offset += 8 + length + (length % 2);
  }
  return {};
}

// OpenEXR: the header is a list of (name\0, type\0, int32 size, value) ended by an empty name;
// read the first part's header, growing the read until it is complete.
async function exrEntries(file) {
  for (let size = 1 << 16; ; size *= 4) {
    const data = await bytes(file, 0, size);
    const view = new DataView(data.buffer);
    const entries = {};
    const zero = (from) => data.indexOf(0, from);
    let offset = 8; // magic, version and flags
    for (;;) {
      const nameEnd = zero(offset);
      if (nameEnd < 0) break;
      if (nameEnd === offset) return entries; // end of the header
      const typeEnd = zero(nameEnd + 1);
      if (typeEnd < 0 || typeEnd + 5 > data.length) break;
      const length = view.getInt32(typeEnd + 1, true);
      const value = typeEnd + 5;
      if (length < 0 || value + length > data.length) break;
      if (utf8.decode(data.subarray(nameEnd + 1, typeEnd)) === "string") {
        entries[utf8.decode(data.subarray(offset, nameEnd)).toLowerCase()] = utf8.decode(
          data.subarray(value, value + length),
        );
      }
      offset = value + length;
    }
    if (size >= file.size) return {}; // the whole file and still no end of header
  }
}

async function lunaEntries(file) {
  const head = await bytes(file, 0, 12);
  if (startsWith(head, [0xff, 0xd8, 0xff])) return jpegEntries(file);
  if (startsWith(head, EXR_MAGIC) || /\.exr$/i.test(file.name)) {
    return startsWith(head, EXR_MAGIC) ? exrEntries(file) : {};
  }
  const riff = utf8.decode(head.subarray(0, 4)) === "RIFF";
  if (riff && utf8.decode(head.subarray(8, 12)) === "WEBP") return webpEntries(file);
  return {};
}

// Loads the file's workflow (or API prompt) and says whether it did. `openSource` and
// `deferWarnings` are what newer frontends pass their own loads; older ones ignore them.
async function loadFromFile(file, openSource, options) {
  let entries;
  try {
    entries = await lunaEntries(file);
  } catch (error) {
    console.warn("[Luna Saver] could not read metadata of", file.name, error);
    return false;
  }
  const name = file.name.replace(/\.\w+$/, "");
  try {
    if (entries.workflow) {
      const workflow = JSON.parse(entries.workflow);
      await app.loadGraphData(workflow, true, true, name, {
        openSource,
        deferWarnings: options?.deferWarnings,
      });
      return true;
    }
    if (entries.prompt) {
      await app.loadApiJson(JSON.parse(entries.prompt), name, {
        deferWarnings: options?.deferWarnings,
      });
      return true;
    }
  } catch (error) {
    console.warn("[Luna Saver] metadata of", file.name, "is not a workflow", error);
  }
  return false;
}

app.registerExtension({
  name: "LunaSaver.LoadWorkflow",
  setup() {
    // Both a drop on the canvas and Workflow > Open end in app.handleFile, in every frontend
    // release: look at the file first, and hand it on when it is not ours.
    const handleFile = app.handleFile.bind(app);
    app.handleFile = async (file, openSource, options, ...rest) => {
      if (file && (await loadFromFile(file, openSource, options))) return;
      return handleFile(file, openSource, options, ...rest);
    };
    // Let Workflow > Open offer these files too.
    const input = document.getElementById("comfy-file-input");
    if (input && input.accept) input.accept += ",.jpg,.jpeg,.exr,image/jpeg,image/x-exr";
  },
});
