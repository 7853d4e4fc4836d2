// The panel's logic: talk to `psd-collage serve`, save and open documents in Photoshop.
// It needs only Photoshop's two host modules, so the tests run it in Node with fakes of
// exactly those (installed as the modules "photoshop" and "uxp") and a real server.
"use strict";

const photoshop = require("photoshop");
const uxp = require("uxp");

const PHASES = { read: "reading", load: "loading the model", ti: "learning layers",
                 sample: "sampling", write: "writing" };

/** Settings from the panel's fields, as the JSON a sidecar would hold ("" when none). */
function settingsFrom({ prompt, variants, steps } = {}) {
  const out = {};
  if (prompt && prompt.trim()) out.prompt = prompt.trim();
  for (const [key, value, high] of [["variants", variants, 64], ["steps", steps, 1000]]) {
    if (value === undefined || value === null || String(value).trim() === "") continue;
    const number = Number(value);
    if (!Number.isInteger(number) || number < 1 || number > high) {
      throw new Error(`${key} must be a whole number from 1 to ${high}`);
    }
    out[key] = number;
  }
  return Object.keys(out).length ? JSON.stringify(out) : "";
}

/** One line for the panel: "sampling 3 of 8", "queued", "done"... */
function progressText(job) {
  if (job.state === "running") {
    const { done = 0, total = 0 } = job.progress || {};
    const phase = PHASES[job.phase] || job.phase || "starting";
    return total ? `${phase} ${done} of ${total}` : phase;
  }
  if (job.state === "failed") return `failed: ${job.error}`;
  return job.state;
}

/** 0..1 for the progress bar. */
function progressFraction(job) {
  if (job.state === "done") return 1;
  const { done = 0, total = 0 } = job.progress || {};
  return job.state === "running" && total ? done / total : 0;
}

/** A multipart/form-data body built by hand: UXP's fetch has no FormData with files. */
function multipart(fields, file) {
  const boundary = `----psd-collage-${Date.now().toString(16)}${Math.random().toString(16).slice(2)}`;
  const encoder = new TextEncoder();
  const parts = [];
  for (const [name, value] of Object.entries(fields)) {
    parts.push(encoder.encode(`--${boundary}\r\nContent-Disposition: form-data; ` +
      `name="${name}"\r\n\r\n${value}\r\n`));
  }
  const filename = file.name.replace(/["\r\n]/g, "_");
  parts.push(encoder.encode(`--${boundary}\r\nContent-Disposition: form-data; name="file"; ` +
    `filename="${filename}"\r\nContent-Type: application/octet-stream\r\n\r\n`));
  parts.push(new Uint8Array(file.data));
  parts.push(encoder.encode(`\r\n--${boundary}--\r\n`));
  const body = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    body.set(part, offset);
    offset += part.length;
  }
  return { body, contentType: `multipart/form-data; boundary=${boundary}` };
}

class Client {
  /** server: "http://127.0.0.1:8765"; token: the server's --token, or "". */
  constructor({ server, token, fetch: fetchImpl, interval = 500 }) {
    this.server = (server || "http://127.0.0.1:8765").replace(/\/+$/, "");
    this.token = token || "";
    this.fetch = fetchImpl || globalThis.fetch;
    this.interval = interval;
  }

  async request(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    let response;
    try {
      response = await this.fetch(this.server + path, { ...options, headers });
    } catch (error) {
      throw new Error(`cannot reach the psd-collage server at ${this.server}: is ` +
        `"psd-collage serve" running there? (${error.cause?.code || error.message})`);
    }
    if (response.status === 401) {
      throw new Error("the server needs its token: enter it under Server and Save");
    }
    if (!response.ok) {
      const text = await response.text();
      let message = text;
      try { message = JSON.parse(text).error || text; } catch (_) { /* plain text */ }
      throw new Error(message.trim() || `${path}: HTTP ${response.status}`);
    }
    return response;
  }

  async submit(name, data, settings) {
    const { body, contentType } = multipart(settings ? { settings } : {}, { name, data });
    const response = await this.request("/api/jobs", {
      // An ArrayBuffer: the body type every fetch (UXP's included) takes.
      method: "POST", body: body.buffer, headers: { "Content-Type": contentType } });
    return response.json();
  }

  async job(id) {
    return (await this.request(`/api/jobs/${encodeURIComponent(id)}`)).json();
  }

  /** Poll until the job ends; onProgress(job) on every change. Returns the final job. */
  async waitFor(id, onProgress = () => {}) {
    let last = "";
    for (;;) {
      const job = await this.job(id);
      const shown = JSON.stringify([job.state, job.phase, job.progress]);
      if (shown !== last) {
        last = shown;
        onProgress(job);
      }
      if (job.state === "done" || job.state === "failed") return job;
      await new Promise((resolve) => setTimeout(resolve, this.interval));
    }
  }

  async download(path) {
    return (await this.request(path)).arrayBuffer();
  }
}

/** A file name for the copy we send: the document's name, always ending in .psd. */
function copyName(documentName) {
  const base = String(documentName || "Untitled").replace(/[\\/:*?"<>|]/g, "_");
  return /\.psd$/i.test(base) ? base : `${base.replace(/\.[^.]*$/, "")}.psd`;
}

async function tempFile(name, data) {
  const folder = await uxp.storage.localFileSystem.getTemporaryFolder();
  const file = await folder.createFile(name, { overwrite: true });
  if (data !== undefined) await file.write(data, { format: uxp.storage.formats.binary });
  return file;
}

/**
 * Send the active document: a PSD copy saved to the temporary folder (the open document
 * stays as it is), then wait for the job. Returns { job, document }.
 */
async function harmonize({ client, fields = {}, onProgress = () => {} }) {
  const document = photoshop.app.activeDocument;
  if (!document) throw new Error("open a document first");
  const settings = settingsFrom(fields);
  const name = copyName(document.name);
  const copy = await tempFile(name);
  await photoshop.core.executeAsModal(
    () => document.saveAs.psd(copy, { maximizeCompatibility: true }, true),
    { commandName: "Save a copy for psd-collage" });
  const data = await copy.read({ format: uxp.storage.formats.binary });
  const submitted = await client.submit(name, data, settings);
  onProgress(submitted);
  const job = await client.waitFor(submitted.id, onProgress);
  if (job.state === "failed") throw new Error(job.error || "the job failed");
  return { job, document };
}

/** Download the harmonized PSD and open it in Photoshop. */
async function openResult({ client, job }) {
  const data = await client.download(job.result);
  const file = await tempFile(`${job.name.replace(/\.ps[db]$/i, "")}.harmonized.psd`, data);
  return photoshop.core.executeAsModal(() => photoshop.app.open(file),
    { commandName: "Open the psd-collage result" });
}

/** Place variant `index` of `job` into `document` as a layer inside a new group. */
async function placeVariant({ client, job, index, document }) {
  const variant = job.variants[index];
  if (!variant) throw new Error(`the job has no variant ${index + 1}`);
  const data = await client.download(variant.png);
  const file = await tempFile(`psd-collage-variant-${job.id}-${index}.png`, data);
  const { app, constants } = photoshop;
  return photoshop.core.executeAsModal(async () => {
    const target = document || app.activeDocument;
    const png = await app.open(file);
    const layer = await png.layers[0].duplicate(target);
    await png.closeWithoutSaving();
    const group = await target.createLayerGroup({ name: `[harmonized] seed ${variant.seed}` });
    await layer.move(group, constants.ElementPlacement.PLACEINSIDE);
    layer.name = `seed ${variant.seed}`;
    return { group, layer };
  }, { commandName: "Place a psd-collage variant" });
}

module.exports = {
  Client, copyName, harmonize, multipart, openResult, placeVariant, progressFraction,
  progressText, settingsFrom,
};
