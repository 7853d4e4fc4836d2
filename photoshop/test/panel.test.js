// The UXP panel's logic (plugin/panel.js) in Node, against a real `psd-collage serve`
// (tiny model, 64 px documents, 2 steps). Photoshop's host modules are faked at the
// module boundary: require("photoshop") and require("uxp") return the fakes below, which
// keep real files in a temporary folder and check that document changes run modally.
// Run: node --test photoshop/test/  (PSD_COLLAGE_PYTHON picks the Python; default .venv)
"use strict";

const assert = require("node:assert/strict");
const { spawn, spawnSync } = require("node:child_process");
const fs = require("node:fs");
const Module = require("node:module");
const os = require("node:os");
const path = require("node:path");
const { after, before, test } = require("node:test");

const REPO = path.resolve(__dirname, "..", "..");
const PYTHON = process.env.PSD_COLLAGE_PYTHON || path.join(REPO, ".venv", "bin", "python");
const TOKEN = "panel-test-token";
const WORK = fs.mkdtempSync(path.join(os.tmpdir(), "psd-collage-panel-"));

// -- fakes of Photoshop's host modules ------------------------------------------------
let modal = false;

class FakeFile {
  constructor(file) { this.nativePath = file; this.name = path.basename(file); }
  async write(data, { format }) {
    assert.equal(format, "binary");
    fs.writeFileSync(this.nativePath, Buffer.from(data));
  }
  async read({ format }) {
    assert.equal(format, "binary");
    const bytes = fs.readFileSync(this.nativePath);
    return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  }
}

class FakeLayer {
  constructor(name, document, source) {
    Object.assign(this, { name, document, source, children: [], parent: null });
  }
  async duplicate(target) {
    assert.ok(modal, "Layer.duplicate outside executeAsModal");
    const copy = new FakeLayer(this.name, target, this.source);
    target.layers.push(copy);
    return copy;
  }
  async move(relative, where) {
    assert.ok(modal, "Layer.move outside executeAsModal");
    assert.equal(where, "placeInside");
    this.document.layers = this.document.layers.filter((layer) => layer !== this);
    relative.children.push(this);
    this.parent = relative;
  }
}

class FakeDocument {
  constructor(name, source) {
    Object.assign(this, { name, source, closed: false });
    this.layers = [new FakeLayer("Layer 0", this, source)];
    this.saveAs = {
      psd: async (file, options, asCopy) => {
        assert.ok(modal, "saveAs outside executeAsModal");
        assert.equal(asCopy, true, "the open document must stay as it is: save a copy");
        assert.equal(options.maximizeCompatibility, true);
        fs.copyFileSync(this.source, file.nativePath);
      },
    };
  }
  async createLayerGroup({ name }) {
    assert.ok(modal, "createLayerGroup outside executeAsModal");
    const group = new FakeLayer(name, this, null);
    this.layers.push(group);
    return group;
  }
  async closeWithoutSaving() { this.closed = true; }
}

const opened = [];
const photoshop = {
  app: {
    activeDocument: null,
    async open(file) {
      assert.ok(modal, "app.open outside executeAsModal");
      const document = new FakeDocument(file.name, file.nativePath);
      opened.push({ document, bytes: fs.readFileSync(file.nativePath) });
      return document;
    },
  },
  core: {
    async executeAsModal(fn, options) {
      assert.ok(options.commandName, "executeAsModal needs a commandName");
      assert.ok(!modal, "nested executeAsModal");
      modal = true;
      try { return await fn({}); } finally { modal = false; }
    },
  },
  constants: { ElementPlacement: { PLACEINSIDE: "placeInside" } },
};
const uxp = {
  storage: {
    formats: { binary: "binary", utf8: "utf8" },
    localFileSystem: {
      async getTemporaryFolder() {
        return {
          async createFile(name, { overwrite }) {
            const file = path.join(WORK, "temp", name);
            fs.mkdirSync(path.dirname(file), { recursive: true });
            if (!overwrite && fs.existsSync(file)) throw new Error("exists");
            return new FakeFile(file);
          },
        };
      },
    },
  },
};

const realLoad = Module._load;
Module._load = function load(request, ...rest) {
  if (request === "photoshop") return photoshop;
  if (request === "uxp") return uxp;
  return realLoad.call(this, request, ...rest);
};
const panel = require("../plugin/panel.js");

// -- a real server ------------------------------------------------------------------
let server;
let url;
const ROOT = path.join(WORK, "hot");

function makePsd(file, seed, tag = "") {
  const code = "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; " +
    "from serve_helpers import make_psd; make_psd(Path(sys.argv[1]), int(sys.argv[2]), tag=sys.argv[3])";
  const run = spawnSync(PYTHON, ["-c", code, file, String(seed), tag], { cwd: REPO });
  assert.equal(run.status, 0, String(run.stderr));
  return file;
}

before(async () => {
  // Made first: spawnSync blocks Node's event loop, which would strand kept-alive sockets.
  makePsd(path.join(WORK, "poster.psd"), 1);
  makePsd(path.join(WORK, "locked.psd"), 2, " [lock]");
  const args = ["-m", "psd_collage.cli", "serve", ROOT, "--port", "0", "--token", TOKEN,
    "--model", "tiny", "--steps", "2", "--variants", "2", "--seed", "1", "--stable", "0.1"];
  server = spawn(PYTHON, args, { cwd: REPO, stdio: ["ignore", "ignore", "pipe"] });
  url = await new Promise((resolve, reject) => {
    let text = "";
    server.stderr.on("data", (chunk) => {
      text += chunk;
      const match = /serving (http:\/\/[\d.]+:\d+)\//.exec(text);
      if (match) resolve(match[1]);
    });
    server.on("exit", (code) => reject(new Error(`serve exited (${code}): ${text}`)));
  });
});

after(async () => {
  if (server && server.exitCode === null) {
    const exited = new Promise((resolve) => server.on("exit", resolve));
    server.kill("SIGTERM");
    await exited;
  }
  fs.rmSync(WORK, { recursive: true, force: true });
});

function client(token = TOKEN) {
  return new panel.Client({ server: `${url}/`, token, interval: 200 });
}

async function get(route) {
  const response = await fetch(url + route, { headers: { Authorization: `Bearer ${TOKEN}` } });
  assert.equal(response.status, 200, route);
  return Buffer.from(await response.arrayBuffer());
}

// -- the tests ------------------------------------------------------------------------
let finished; // { job, document } of the first test, for the next ones

test("Harmonize sends a copy of the active document, shows progress and opens the result",
  { timeout: 300_000 }, async () => {
    const source = path.join(WORK, "poster.psd");
    photoshop.app.activeDocument = new FakeDocument("poster", source);
    const seen = [];
    finished = await panel.harmonize({
      client: client(),
      fields: { prompt: "a sunny meadow", variants: "2", steps: "" },
      onProgress: (job) => seen.push([job.state, panel.progressText(job),
                                      panel.progressFraction(job)]),
    });
    assert.equal(seen[0][0], "queued");
    assert.deepEqual(seen.at(-1), ["done", "done", 1]);
    assert.equal(finished.job.name, "poster.psd");
    assert.equal(finished.job.variants.length, 2);
    // The sent copy carried the panel's fields as the job's settings.
    const sidecar = fs.readFileSync(path.join(ROOT, "originals", "poster.psd.toml"), "utf8");
    assert.match(sidecar, /prompt = "a sunny meadow"/);
    assert.match(sidecar, /variants = 2/);
    assert.deepEqual(fs.readFileSync(path.join(ROOT, "originals", "poster.psd")),
      fs.readFileSync(source));

    await panel.openResult({ client: client(), job: finished.job });
    const { document, bytes } = opened.at(-1);
    assert.equal(document.name, "poster.harmonized.psd");
    assert.deepEqual(bytes, fs.readFileSync(path.join(ROOT, "done", "poster.psd")));
    assert.equal(bytes.subarray(0, 4).toString(), "8BPS");
  });

test("a chosen variant is placed into the open document as a new group",
  { timeout: 60_000 }, async () => {
    assert.ok(finished, "needs the first test's job");
    const target = finished.document;
    const { group, layer } = await panel.placeVariant({
      client: client(), job: finished.job, index: 1, document: target });
    const seed = finished.job.variants[1].seed;
    assert.equal(group.name, `[harmonized] seed ${seed}`);
    assert.ok(target.layers.includes(group));
    assert.deepEqual(group.children, [layer]);
    assert.equal(layer.name, `seed ${seed}`);
    const png = opened.at(-1);
    assert.ok(png.document.closed, "the PNG's own document is closed again");
    assert.deepEqual(png.bytes, await get(finished.job.variants[1].png));
    assert.equal(png.bytes.subarray(1, 4).toString(), "PNG");
  });

test("a failed job is reported in plain words", { timeout: 120_000 }, async () => {
  const locked = path.join(WORK, "locked.psd");
  photoshop.app.activeDocument = new FakeDocument("locked.psd", locked);
  await assert.rejects(panel.harmonize({ client: client() }), /every layer is locked/);
});

test("a wrong token or a missing server says what to do", { timeout: 30_000 }, async () => {
  photoshop.app.activeDocument = new FakeDocument("poster", path.join(WORK, "poster.psd"));
  await assert.rejects(panel.harmonize({ client: client("nope") }), /needs its token/);
  const nowhere = new panel.Client({ server: "http://127.0.0.1:9", token: "" });
  await assert.rejects(nowhere.job("x"), /cannot reach the psd-collage server/);
  photoshop.app.activeDocument = null;
  await assert.rejects(panel.harmonize({ client: client() }), /open a document first/);
});

test("the panel's fields are checked before anything is sent", () => {
  assert.equal(panel.settingsFrom({ prompt: "  ", variants: "", steps: undefined }), "");
  assert.equal(panel.settingsFrom({ prompt: "sky", steps: "20" }), '{"prompt":"sky","steps":20}');
  assert.throws(() => panel.settingsFrom({ variants: "0" }), /variants must be a whole number/);
  assert.throws(() => panel.settingsFrom({ steps: "2.5" }), /steps must be a whole number/);
  assert.equal(panel.copyName("Untitled-1"), "Untitled-1.psd");
  assert.equal(panel.copyName("poster.psb"), "poster.psd");
  assert.equal(panel.copyName("a/b:c.psd"), "a_b_c.psd");
});

test("the plugin is a manifest v5 panel whose files exist", () => {
  const folder = path.join(__dirname, "..", "plugin");
  const manifest = JSON.parse(fs.readFileSync(path.join(folder, "manifest.json"), "utf8"));
  assert.equal(manifest.manifestVersion, 5);
  assert.equal(manifest.host.app, "PS");
  assert.equal(manifest.entrypoints[0].type, "panel");
  const html = fs.readFileSync(path.join(folder, manifest.main), "utf8");
  for (const [, src] of html.matchAll(/<script src="([^"]+)"/g)) {
    assert.ok(fs.existsSync(path.join(folder, src)), src);
  }
});
