// tuner ui: one page over the JSON API of tuner.ui.routes. No framework: the page is small and a browser test
// drives it by element ids.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { run: "", meta: null, fields: {}, advanced: {}, polling: null, shownGrids: "" };

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: text }; }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}
const post = (path, body) => api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });
const put = (path, body) => api(path, { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
const runUrl = (suffix = "") => `/api/runs/${encodeURIComponent(state.run)}${suffix}`;
const fileUrl = (rel) => `${runUrl("/file")}?path=${encodeURIComponent(rel)}&t=${Date.now()}`;
function say(id, text, isError = false) { const el = $(id); el.textContent = text; el.classList.toggle("error", isError); }
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) { if (k === "class") node.className = v; else node[k] = v; }
  for (const c of children) node.append(c);
  return node;
}

// --- runs --------------------------------------------------------------------------------------------
async function refreshRuns() {
  const runs = await api("/api/runs");
  const select = $("run-select");
  select.replaceChildren(el("option", { value: "", textContent: runs.length ? "(pick a run)" : "(none yet)" }));
  for (const r of runs) select.append(el("option", { value: r.name, textContent: `${r.name} — ${r.status}` }));
  select.value = state.run;
}
async function newRun() {
  const run = await post("/api/runs", { name: $("new-name").value });
  $("new-name").value = "";
  await selectRun(run.name);
  return run.name;
}
async function ensureRun() { return state.run || newRun(); }
async function selectRun(name) {
  state.run = name; state.shownGrids = "";
  await refreshRuns();
  $("check-report").replaceChildren(); $("upload-messages").replaceChildren(); $("cmp-result").replaceChildren();
  if (!name) return;
  const run = await api(runUrl());
  loadTask(run.task);
  $("cmp-prompt").value = run.prompt || "";
  renderRun(run);
}

// --- photos ------------------------------------------------------------------------------------------
async function uploadFiles(files) {
  await ensureRun();
  const list = $("upload-messages");
  const isCaption = (f) => f.name.toLowerCase().endsWith(".txt");
  files = [...files.filter((f) => !isCaption(f)), ...files.filter(isCaption)];  // photos first, then their captions
  for (const file of files) {
    let r;
    try {
      r = await api(`${runUrl("/photos")}?filename=${encodeURIComponent(file.name)}`, { method: "PUT", body: file });
    } catch (e) { r = { original: file.name, name: null, reason: "upload failed", detail: e.message }; }
    list.append(uploadLine(r));
  }
  await refreshRun();
}
function uploadLine(r) {
  if (r.name) return el("li", { class: "used", textContent: `${r.original}: ${r.name.endsWith(".txt") ? "caption" : "added as"} ${r.name}` });
  return el("li", { class: "refused", textContent: `${r.original}: refused — ${r.reason}${r.detail ? ": " + r.detail : ""}` });
}
async function importFolder() {
  await ensureRun();
  try {
    const results = await post(runUrl("/import"), { path: $("folder-path").value });
    for (const r of results) $("upload-messages").append(uploadLine(r));
  } catch (e) { $("upload-messages").append(el("li", { class: "refused", textContent: e.message })); }
  await refreshRun();
}
function renderPhotos(photos) {
  const box = $("photos");
  const key = JSON.stringify(photos);
  if (box.dataset.key === key || box.contains(document.activeElement)) return;  // keep a caption being edited
  box.dataset.key = key;
  box.replaceChildren(...photos.map((p) => {
    const caption = el("textarea", { rows: 2, value: p.caption, placeholder: "caption (empty: the task's prompt)" });
    caption.addEventListener("change", () => put(runUrl("/caption"), { photo: p.name, text: caption.value }).catch((e) => alert(e.message)));
    const remove = el("button", { textContent: "remove" });
    remove.addEventListener("click", async () => { await api(runUrl(`/photos/${encodeURIComponent(p.name)}`), { method: "DELETE" }); refreshRun(); });
    return el("div", { class: "thumb" }, el("img", { src: fileUrl(`photos/${p.name}`), alt: p.name }), el("div", { textContent: p.name }), caption, remove);
  }));
}
async function checkData() {
  const box = $("check-report");
  box.replaceChildren(el("p", { class: "note", textContent: "checking…" }));
  try {
    await saveTask();
    const report = await post(runUrl("/check"));
    const s = report.summary;
    const rows = report.files.filter((f) => f.status !== "used").map((f) =>
      el("tr", { class: f.status }, el("td", { textContent: f.name }), el("td", { textContent: f.status }), el("td", { textContent: f.reason || "" }), el("td", { textContent: f.detail })));
    box.replaceChildren(
      el("p", { id: "check-summary", textContent: `${s.found} found, ${s.used} used, ${s.skipped} skipped, ${s.refused} refused` }),
      rows.length ? el("table", { class: "report" }, el("tr", {}, ...["file", "status", "reason", "detail"].map((h) => el("th", { textContent: h }))), ...rows) : el("p", { class: "note", textContent: "every file will be used" }),
      el("pre", { textContent: report.text }));
  } catch (e) { box.replaceChildren(el("p", { class: "error", textContent: e.message })); }
}

// --- task --------------------------------------------------------------------------------------------
function fillPresets(method, chosen) {
  const presets = state.meta.presets[method] || [];
  $("preset").replaceChildren(...presets.map((p) => el("option", { value: p.name, textContent: `${p.name}${p.families.length ? " (" + p.families.join(", ") + ")" : ""}`, title: p.summary })));
  if (chosen && presets.some((p) => p.name === chosen)) $("preset").value = chosen;
}
function loadTask(task) {
  $("kind").value = task.kind; $("trigger").value = task.trigger; $("class-word").value = task.class_word;
  $("method").value = task.method; fillPresets(task.method, task.preset);
  $("model").value = task.model; $("vram").value = task.vram || "";
  state.advanced = { ...(task.advanced || {}) };
  loadFields();
}
function currentTask() {
  return { kind: $("kind").value, trigger: $("trigger").value, class_word: $("class-word").value, method: $("method").value,
           model: $("model").value, preset: $("preset").value, vram: $("vram").value ? Number($("vram").value) : null, advanced: state.advanced };
}
async function loadFields() {
  const vram = $("vram").value ? `&vram=${encodeURIComponent($("vram").value)}` : "";
  try {
    const r = await api(`/api/fields?preset=${encodeURIComponent($("preset").value)}${vram}`);
    say("memory", r.memory);
    renderFields(r.tables);
  } catch (e) { say("memory", e.message, true); }
}
function parseField(f, input) {
  if (f.kind === "bool") return input.checked;
  const raw = input.value.trim();
  if (raw === "" && f.nullable) return null;
  if (f.kind === "int" || f.kind === "float") return Number(raw);
  if (f.kind === "list") return JSON.parse(raw || "[]");
  return input.value;
}
function renderFields(tables) {
  const box = $("advanced-fields");
  box.replaceChildren(...Object.entries(tables).map(([table, fields]) => el("fieldset", {}, el("legend", { textContent: `[${table}]` }), ...fields.map((f) => {
    const value = f.key in state.advanced ? state.advanced[f.key] : f.value;
    let input;
    if (f.kind === "bool") input = el("input", { type: "checkbox", checked: !!value });
    else if (f.kind === "choice") input = el("select", {}, ...f.choices.map((c) => el("option", { value: c, textContent: c })));
    else input = el("input", { type: f.kind === "int" || f.kind === "float" ? "number" : "text", step: "any", value: value === null ? "" : (f.kind === "list" ? JSON.stringify(value) : value) });
    if (f.kind === "choice") input.value = value;
    input.name = f.key; input.title = f.doc;
    input.addEventListener("change", () => {
      try { state.advanced[f.key] = parseField(f, input); input.classList.remove("error"); } catch (e) { input.classList.add("error"); }
    });
    return el("label", {}, el("code", { textContent: f.key }), input, el("span", { class: "doc", textContent: f.doc }));
  }))));
}
async function saveTask() {
  await ensureRun();
  const run = await api(runUrl());
  if (!["new", "failed"].includes(run.status) || run.checkpoints.length) return run.task;  // fixed once training began
  const r = await put(runUrl("/task"), currentTask());
  say("task-msg", `${r.method}: ${r.steps} steps${r.instance_prompt ? " · prompt “" + r.instance_prompt + "”" : ""}`);
  return r;
}

// --- train -------------------------------------------------------------------------------------------
async function runAction(action) {
  try {
    if (action === "train") await saveTask();
    const r = await post(runUrl(`/${action}`));
    say("train-msg", r.message || r.status);
  } catch (e) { say("train-msg", e.message, true); }
  await refreshRun();
}
function fmtTime(s) { if (s == null) return "?"; s = Math.round(s); return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`; }
function renderRun(run) {
  $("run-status").textContent = run.status + (run.queue ? ` (#${run.queue} in queue)` : "");
  $("run-status").dataset.status = run.status;
  renderPhotos(run.photos);
  const p = run.progress;
  $("progress").max = p.total || 1; $("progress").value = p.step || 0;
  const parts = [`step ${p.step}${p.total ? "/" + p.total : ""}`];
  if (p.loss != null) parts.push(`loss ${p.loss.toFixed(4)}`);
  if (p.lr != null) parts.push(`lr ${p.lr.toExponential(2)}`);
  if (p.it_s != null) parts.push(`${p.it_s.toFixed(2)} it/s`);
  if (p.eta_s != null && run.status === "running") parts.push(`ETA ${fmtTime(p.eta_s)}`);
  $("stats").textContent = parts.join(" · ");
  $("stats").dataset.step = p.step;
  say("train-msg", `${run.status}: ${run.message || ""}${run.checkpoints.length ? " · checkpoints: " + run.checkpoints.join(", ") : ""}`, run.status === "failed");
  $("log").textContent = run.log.join("\n");
  $("log").scrollTop = $("log").scrollHeight;
  const active = ["queued", "running", "stopping"].includes(run.status);
  $("train-btn").disabled = active || run.finished || run.checkpoints.length > 0;
  $("stop-btn").disabled = !active;
  $("resume-btn").disabled = active || run.finished || !["stopped", "interrupted", "failed"].includes(run.status);
  $("cmp-btn").disabled = !run.finished; $("pub-btn").disabled = !run.finished;
  if (run.finished && !$("cmp-prompt").value) $("cmp-prompt").value = run.prompt || "";
  const key = run.grids.join("|") + run.status;
  if (key !== state.shownGrids) {
    state.shownGrids = key;
    $("grids").replaceChildren(...run.grids.map((g) => el("figure", {}, el("img", { src: fileUrl(g), alt: g }), el("figcaption", { textContent: g.split("/").pop() }))));
  }
}
async function refreshRun() {
  if (!state.run) return;
  try { renderRun(await api(runUrl())); } catch (e) { say("train-msg", e.message, true); }
}

// --- compare and publish -----------------------------------------------------------------------------
async function compare() {
  say("cmp-msg", "sampling…");
  try {
    const seeds = $("cmp-seeds").value.split(/[\s,]+/).filter(Boolean).map(Number);
    const r = await post(runUrl("/compare"), { prompt: $("cmp-prompt").value, seeds, scale: Number($("cmp-scale").value), steps: Number($("cmp-steps").value) });
    $("cmp-result").replaceChildren(...Object.entries(r.grids).map(([label, rel]) => el("figure", {}, el("img", { src: fileUrl(rel), alt: label }), el("figcaption", { textContent: label }))));
    say("cmp-msg", "done");
  } catch (e) { say("cmp-msg", e.message, true); }
}
async function publish() {
  say("pub-msg", "staging…");
  const token = $("pub-token").value;
  $("pub-token").value = "";  // used for this one request only
  try {
    const r = await post(runUrl("/publish"), { repo_id: $("pub-repo").value, private: $("pub-private").checked, base_model: $("pub-base").value,
                                               license: $("pub-license").value, token, dry_run: $("pub-dry").checked });
    $("pub-files").replaceChildren(...r.files.map((f) => el("li", { textContent: f })));
    $("pub-card").textContent = r.card || "";
    say("pub-msg", r.dry_run ? `dry run: ${r.files.length} files would be uploaded; nothing was sent` : `published to ${r.url}`);
  } catch (e) { say("pub-msg", e.message, true); }
}

// --- wiring ------------------------------------------------------------------------------------------
async function start() {
  state.meta = await api("/api/meta");
  $("method").replaceChildren(...Object.entries(state.meta.methods).map(([k, label]) => el("option", { value: k, textContent: label })));
  loadTask(state.meta.default_task);
  $("run-select").addEventListener("change", (e) => selectRun(e.target.value));
  $("new-btn").addEventListener("click", newRun);
  $("file-input").addEventListener("change", (e) => uploadFiles([...e.target.files]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); uploadFiles([...e.dataTransfer.files]); });
  $("import-btn").addEventListener("click", importFolder);
  $("check-btn").addEventListener("click", checkData);
  $("method").addEventListener("change", () => { fillPresets($("method").value); state.advanced = {}; loadFields(); });
  $("preset").addEventListener("change", () => { state.advanced = {}; loadFields(); });
  $("vram").addEventListener("change", loadFields);
  $("train-btn").addEventListener("click", () => runAction("train"));
  $("stop-btn").addEventListener("click", () => runAction("stop"));
  $("resume-btn").addEventListener("click", () => runAction("resume"));
  $("cmp-scale").addEventListener("input", () => { $("cmp-scale-value").textContent = $("cmp-scale").value; });
  $("cmp-btn").addEventListener("click", compare);
  $("pub-btn").addEventListener("click", publish);
  await refreshRuns();
  setInterval(refreshRun, 1000);
  setInterval(refreshRuns, 4000);
}
start().catch((e) => alert(e.message));
