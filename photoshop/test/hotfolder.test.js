// The ExtendScript fallback (extendscript/psd-collage-hotfolder.jsx) in Node's vm, against
// a real `psd-collage watch ROOT` (tiny model). ExtendScript's globals (File, Folder, $,
// app, alert...) are faked over the real file system; $.sleep really sleeps, like
// Photoshop's, while the watcher works in its own process.
"use strict";

const assert = require("node:assert/strict");
const { spawn, spawnSync } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { after, before, test } = require("node:test");
const vm = require("node:vm");

const REPO = path.resolve(__dirname, "..", "..");
const PYTHON = process.env.PSD_COLLAGE_PYTHON || path.join(REPO, ".venv", "bin", "python");
const SCRIPT = path.join(__dirname, "..", "extendscript", "psd-collage-hotfolder.jsx");
const WORK = fs.mkdtempSync(path.join(os.tmpdir(), "psd-collage-jsx-"));
const ROOT = path.join(WORK, "hot");

class File {
  constructor(file) { this.fsName = String(file); }
  get name() { return path.basename(this.fsName); }
  get exists() { return fs.existsSync(this.fsName) && fs.statSync(this.fsName).isFile(); }
  open(mode) { this.mode = mode; this.buffer = ""; return true; }
  read() { return fs.readFileSync(this.fsName, "utf8"); }
  write(text) { this.buffer += text; return true; }
  close() { if (this.mode === "w") fs.writeFileSync(this.fsName, this.buffer); return true; }
  rename(name) {
    const target = path.join(path.dirname(this.fsName), name);
    fs.renameSync(this.fsName, target);
    this.fsName = target;
    return true;
  }
}

class Folder {
  constructor(folder) { this.fsName = String(folder); }
  get exists() { return fs.existsSync(this.fsName) && fs.statSync(this.fsName).isDirectory(); }
  static selectDialog() { Folder.asked += 1; return new Folder(ROOT); }
}
Folder.asked = 0;
Folder.userData = path.join(WORK, "userdata");

const sleeper = new Int32Array(new SharedArrayBuffer(4));

function photoshopGlobals(source) {
  const opened = [];
  const alerts = [];
  const document = {
    name: "poster.psd",
    saveAs(file, options, asCopy) {
      assert.equal(asCopy, true, "the open document must stay as it is: save a copy");
      assert.equal(options.layers, true);
      assert.ok(path.basename(file.fsName).startsWith("."), "saved under a hidden name first");
      fs.copyFileSync(source, file.fsName);
    },
  };
  const context = vm.createContext({
    File, Folder,
    $: { sleep: (ms) => Atomics.wait(sleeper, 0, 0, ms) },
    app: { documents: { length: 1 }, activeDocument: document,
           open: (file) => opened.push(file.fsName) },
    alert: (text) => alerts.push(text),
    PhotoshopSaveOptions: function PhotoshopSaveOptions() {},
    Extension: { LOWERCASE: 2 },
    PSD_COLLAGE_NO_RUN: true,
  });
  vm.runInContext(fs.readFileSync(SCRIPT, "utf8"), context, { filename: SCRIPT });
  return { context, opened, alerts };
}

function makePsd(file, seed, tag = "") {
  const code = "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; " +
    "from serve_helpers import make_psd; make_psd(Path(sys.argv[1]), int(sys.argv[2]), tag=sys.argv[3])";
  const run = spawnSync(PYTHON, ["-c", code, file, String(seed), tag], { cwd: REPO });
  assert.equal(run.status, 0, String(run.stderr));
  return file;
}

let watcher;
before(() => {
  makePsd(path.join(WORK, "poster.psd"), 1);
  makePsd(path.join(WORK, "locked.psd"), 2, " [lock]");
  fs.mkdirSync(Folder.userData);
  const log = fs.openSync(path.join(WORK, "watch.out"), "w");
  const args = ["-m", "psd_collage.cli", "watch", ROOT, "--stable", "0.3",
    "--model", "tiny", "--steps", "2", "--variants", "1", "--seed", "1"];
  watcher = spawn(PYTHON, args, { cwd: REPO, stdio: ["ignore", log, log] });
});

after(async () => {
  if (watcher.exitCode === null) {
    const exited = new Promise((resolve) => watcher.on("exit", resolve));
    watcher.kill("SIGTERM");
    await exited;
  }
  fs.rmSync(WORK, { recursive: true, force: true });
});

test("the script drops a copy into ROOT/inbox and opens the result from ROOT/done",
  { timeout: 300_000 }, () => {
    const deadline = Date.now() + 60_000;
    while (!fs.existsSync(path.join(ROOT, "inbox")) && Date.now() < deadline) {
      Atomics.wait(sleeper, 0, 0, 100);
    }
    const source = path.join(WORK, "poster.psd");
    const { context, opened, alerts } = photoshopGlobals(source);
    const outcome = vm.runInContext("PSD_COLLAGE.run(240)", context);
    assert.deepEqual(alerts, []);
    assert.equal(outcome[0], "done", String(outcome[1]));
    assert.equal(Folder.asked, 1);
    assert.equal(fs.readFileSync(path.join(Folder.userData, "psd-collage-hotfolder.txt"), "utf8"),
      ROOT);
    assert.equal(opened.length, 1);
    const result = opened[0];
    assert.match(path.basename(result), /^poster-\d{8}-\d{6}\.psd$/);
    assert.equal(path.dirname(result), path.join(ROOT, "done"));
    assert.equal(fs.readFileSync(result).subarray(0, 4).toString(), "8BPS");
    assert.deepEqual(fs.readFileSync(path.join(ROOT, "originals", path.basename(result))),
      fs.readFileSync(source));
  });

test("a failure is shown with the hot folder's reason; ROOT is remembered",
  { timeout: 120_000 }, () => {
    const { context, opened, alerts } = photoshopGlobals(path.join(WORK, "locked.psd"));
    const outcome = vm.runInContext("PSD_COLLAGE.run(100)", context);
    assert.equal(outcome[0], "failed");
    assert.equal(Folder.asked, 1, "the remembered ROOT is used");
    assert.deepEqual(opened, []);
    assert.equal(alerts.length, 1);
    assert.match(alerts[0], /^psd-collage: .*every layer is locked/);
  });
