// The status page: one EventSource on /api/events; each "status" event redraws the page.
"use strict";

const PHASES = { read: "reading", load: "loading model", ti: "learning layers",
                 sample: "sampling", write: "writing",
                 redelivery: "its worker is gone: waiting for another worker" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

async function act(method, url) {
  const response = await fetch(url, { method, credentials: "same-origin" });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    alert(body.error || `${method} ${url}: ${response.status}`);
  }
}

function runningCard(job) {
  const { done, total } = job.progress || { done: 0, total: 0 };
  const percent = total ? Math.round((100 * done) / total) : 0;
  const phase = PHASES[job.phase] || job.phase || "starting";
  return el("div", { class: "card running", "data-id": job.id || "" },
    el("div", { class: "name" }, job.name),
    el("div", { class: "bar" }, el("div", { style: `width: ${percent}%` })),
    el("div", { class: "meta" },
      `${phase}${total ? ` ${done} of ${total}` : ""}`,
      job.worker ? ` · on ${job.worker}` : "",
      job.started ? ` · since ${when(job.started)}` : ""));
}

function queueItem(job) {
  return el("li", { "data-id": job.id || "" },
    el("span", { class: "name" }, job.name), " ",
    job.note ? el("span", { class: "meta" }, `(${job.note}) `) : null,
    job.id ? el("button", { onclick: () => act("DELETE", `/api/jobs/${job.id}`) }, "Cancel") : null);
}

function failureItem(job) {
  return el("li", { class: "card failure", "data-id": job.id || "" },
    el("div", { class: "name" }, job.name),
    el("div", { class: "reason" }, job.error || "failed"),
    el("div", { class: "meta" }, job.finished ? `at ${when(job.finished)} ` : ""),
    job.note ? el("div", { class: "meta note" }, job.note) : null,
    job.id && job.retryable !== false
      ? el("button", { onclick: () => act("POST", `/api/jobs/${job.id}/retry`) }, "Retry")
      : null);
}

function resultCard(job) {
  const variants = job.variants || [];
  let thumbs;
  if (job.preview) {
    const seeds = variants.map((v) => `seed ${v.seed}`).join(" · ");
    thumbs = el("figure", {},
      el("a", { href: job.preview, target: "_blank" },
        el("img", { src: job.preview, alt: `before and after: ${job.name}` })),
      el("figcaption", {}, `before · ${seeds}`));
  } else {
    thumbs = variants.map((v) => el("figure", {},
      el("img", { src: `${v.png}?max=256`, alt: `seed ${v.seed}` }),
      el("figcaption", {}, `seed ${v.seed}`)));
  }
  return el("div", { class: "card result", "data-id": job.id || "" },
    el("div", { class: "name" }, job.name, " "),
    el("div", { class: "meta" },
      job.finished ? `${when(job.finished)} · ` : "",
      job.seconds ? `${job.seconds.toFixed(1)} s · ` : "",
      el("a", { href: job.result }, "PSD"),
      variants.map((v, n) => [" · ", el("a", { href: v.png, target: "_blank" }, `variant ${n + 1}`)])),
    el("div", { class: "thumbs" }, thumbs));
}

function workerState(w) {
  if (w.state === "gone") return `gone: silent for ${Math.round(w.silent_s || 0)} s`;
  if (w.state === "lost") return "lost its job";
  return w.job && w.state === "working" ? `working on ${w.file || w.job}` : (w.state || "idle");
}

function fill(id, items, emptyId) {
  const node = document.getElementById(id);
  node.replaceChildren(...items);
  if (emptyId) document.getElementById(emptyId).hidden = items.length > 0;
}

function render(status) {
  const jobs = status.jobs || [];
  const badge = document.getElementById("service");
  badge.textContent = status.state || "unknown";
  badge.className = `badge ${status.state || ""}`;
  document.getElementById("message").textContent = status.message || "";

  const running = jobs.filter((j) => j.state === "running");
  document.getElementById("running").replaceChildren(
    ...(running.length ? running.map(runningCard)
      : [el("p", { class: "empty" }, "Nothing is rendering.")]));
  const queued = jobs.filter((j) => j.state === "queued").reverse();
  fill("queue", queued.map(queueItem), "queue-empty");
  const failed = jobs.filter((j) => j.state === "failed");
  fill("failed", failed.map(failureItem));
  document.getElementById("failed-section").hidden = failed.length === 0;
  const done = jobs.filter((j) => j.state === "done").slice(0, 20);
  fill("done", done.map(resultCard), "done-empty");
  const workers = status.workers || [];
  fill("workers", workers.map((w) => el("li", { class: `worker ${w.state || ""}` },
    el("span", { class: "name" }, w.name || w.worker || w.host || "worker"), " ",
    el("span", { class: "meta" }, workerState(w)))));
  document.getElementById("workers-section").hidden = workers.length === 0;
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("status", (event) => render(JSON.parse(event.data)));
  source.onerror = () => {
    const badge = document.getElementById("service");
    badge.textContent = "offline";
    badge.className = "badge offline";
  };
}

document.getElementById("upload").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = new FormData();
  body.append("file", form.file.files[0]);
  if (form.prompt.value.trim()) {
    body.append("settings", JSON.stringify({ prompt: form.prompt.value.trim() }));
  }
  const out = document.getElementById("upload-result");
  const response = await fetch("/api/jobs", { method: "POST", body, credentials: "same-origin" });
  const reply = await response.json().catch(() => ({}));
  out.textContent = response.ok ? `queued as ${reply.id}` : reply.error || `error ${response.status}`;
  if (response.ok) form.reset();
});

connect();
