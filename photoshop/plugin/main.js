// The panel's wiring: fields and buttons -> panel.js. Kept thin: the logic is tested there.
"use strict";

const panel = require("./panel.js");

const $ = (id) => document.getElementById(id);
let last = null; // { job, document } of the last finished job

function client() {
  return new panel.Client({ server: localStorage.getItem("server") || "",
                            token: localStorage.getItem("token") || "" });
}

function show(job) {
  $("status").textContent = panel.progressText(job);
  $("bar").firstElementChild.style.width = `${Math.round(100 * panel.progressFraction(job))}%`;
}

function fail(error) {
  $("status").textContent = `Error: ${error.message}`;
  $("harmonize").disabled = false;
}

function showVariants(job) {
  const list = $("variants");
  list.replaceChildren();
  job.variants.forEach((variant, index) => {
    const button = document.createElement("button");
    button.textContent = `Place variant ${index + 1} (seed ${variant.seed})`;
    button.addEventListener("click", () =>
      panel.placeVariant({ client: client(), job, index, document: last.document }).catch(fail));
    list.append(button);
  });
  $("result").hidden = false;
}

$("server").value = localStorage.getItem("server") || "";
$("token").value = localStorage.getItem("token") || "";
$("save").addEventListener("click", () => {
  localStorage.setItem("server", $("server").value.trim());
  localStorage.setItem("token", $("token").value.trim());
  $("status").textContent = "Saved.";
});

$("harmonize").addEventListener("click", async () => {
  $("harmonize").disabled = true;
  $("result").hidden = true;
  $("status").textContent = "Saving a copy…";
  try {
    const fields = { prompt: $("prompt").value, variants: $("variants").value,
                     steps: $("steps").value };
    last = await panel.harmonize({ client: client(), fields, onProgress: show });
    show(last.job);
    showVariants(last.job);
  } catch (error) {
    fail(error);
    return;
  }
  $("harmonize").disabled = false;
});

$("open").addEventListener("click", () => {
  if (last) panel.openResult({ client: client(), job: last.job }).catch(fail);
});
