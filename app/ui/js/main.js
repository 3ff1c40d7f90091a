// The dashboard: hash routes, one render function per page. Plain DOM, no framework.
import { API, ApiError, api, clearKey, download, followEvents, getKey, qs, setKey, upload } from "./api.js";
import { barChart, heatmap, lineChart } from "./plots.js";

const main = document.getElementById("main");
const state = { scopes: new Set(), name: "", cleanup: [] };

// ---------- small DOM helpers ----------
// replaceChildren that leaves out null/false parts (as h() does) instead of printing "null".
function fill(node, ...kids) {
  node.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
}
function h(tag, attrs = {}, ...kids) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(n.dataset, v);
    else n.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined && k !== false) n.append(k instanceof Node ? k : String(k));
  return n;
}
const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`);
const num = (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en"));
const secs = (s) => {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
};
// A run's kernel budget (metrics.kernel_budget): the share of kernels asked, the share reached,
// and how often the accuracy guard loosened it.
function budgetText(b) {
  if (!b || b.target_krr == null || b.target_krr >= 1) return "none";
  let t = `asked ${pct(b.target_krr)}, reached ${pct(b.kernel_rate)}`;
  if (b.relaxed) t += ` (the guard loosened it ${b.relaxed}×, to ${pct(b.final_target)})`;
  return t;
}
function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
}
function errorBox() { return h("div", { class: "error", role: "alert", hidden: true }); }
function showError(box, e) {
  box.hidden = false;
  box.textContent = e instanceof ApiError || e instanceof Error ? e.message : String(e);
  if (e instanceof ApiError && e.status === 401) box.textContent += " — sign in again with a valid key.";
}
function hideError(box) { box.hidden = true; box.textContent = ""; }
function progressBar(percent) {
  const p = Math.max(0, Math.min(100, percent || 0));
  return h("div", { class: "progress", role: "progressbar", "aria-valuenow": p.toFixed(0), "aria-valuemin": 0, "aria-valuemax": 100 },
    h("div", { style: `width:${p}%` }));
}
function statusBadge(s) { return h("span", { class: `status ${s}` }, s); }
function table(cols, rows, onRow) {
  return h("div", { class: "table-wrap" }, h("table", {},
    h("thead", {}, h("tr", {}, cols.map((c) => h("th", { class: c.narrow === false ? "hide-narrow" : null }, c.label)))),
    h("tbody", {}, rows.map((r) => h("tr", { class: onRow ? "link" : null, onclick: onRow ? () => onRow(r) : null },
      cols.map((c) => h("td", { class: c.narrow === false ? "hide-narrow" : null }, c.get(r))))))));
}
// Elements that need a scope the key lacks are hidden and disabled (the API would refuse anyway).
function needs(scope, node) {
  if (!state.scopes.has(scope)) {
    node.classList.add("hidden-by-scope");
    node.querySelectorAll?.("input,button,select").forEach((x) => { x.disabled = true; });
    if ("disabled" in node) node.disabled = true;
  }
  return node;
}
async function downloadButton(label, path, sha, out) {
  return h("button", { class: "secondary", type: "button", onclick: async (ev) => {
    const b = ev.currentTarget; b.disabled = true; hideError(out.err); out.msg.textContent = "downloading…";
    try {
      const r = await download(path, sha);
      out.msg.textContent = `${r.filename}: ${num(r.size)} bytes, sha256 ${r.verified ? "verified ✓" : "not checked (needs https or localhost)"}`;
      out.msg.dataset.sha256 = r.sha256 || "";
    } catch (e) { out.msg.textContent = ""; showError(out.err, e); } finally { b.disabled = false; }
  } }, label);
}
function downloadArea() { return { err: errorBox(), msg: h("span", { class: "muted download-result" }) }; }

// ---------- sign-in ----------
function renderLogin(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("who").textContent = "";
  const err = errorBox();
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", placeholder: "mwt_…", required: true });
  const form = h("form", { class: "card", id: "login", onsubmit: async (ev) => {
    ev.preventDefault(); hideError(err);
    setKey(input.value.trim());
    try { await whoami(); route(); } catch (e) { clearKey(); showError(err, e); }
  } },
  h("h1", {}, "Sign in"),
  h("p", { class: "muted" }, "Paste an API key (`mwt serve` prints the admin key once; `mwt keys create` makes others). It is kept for this browser tab only."),
  h("label", {}, "API key", input), h("div", { class: "row" }, h("button", { type: "submit" }, "Continue")), err);
  fill(main, form);
  if (message) showError(err, message);
  input.focus();
}
async function whoami() {
  const me = await api("whoami");
  state.scopes = new Set(me.scopes); state.name = me.name;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").replaceChildren(`${me.name} · ${me.scopes.join(", ")} `,
    h("button", { class: "secondary", type: "button", id: "sign-out", onclick: () => { clearKey(); state.scopes = new Set(); renderLogin(); } }, "Sign out"));
}

// ---------- Jobs ----------
let jobDefaults = null;
async function jobSchema() {
  if (!jobDefaults) {
    const spec = await fetch("/openapi.json").then((r) => r.json());
    jobDefaults = spec.components.schemas.JobCreate.properties;
  }
  return jobDefaults;
}
const JOB_FIELDS = ["dataset", "arch", "epochs", "width", "batch_size", "lr", "mask_lr", "alpha", "beta", "gamma", "target_krr", "tau", "seed", "modular", "augment", "name"];
// What a field shows where its default is null (the server then applies its own rule).
const NULL_MEANS = { width: "architecture's", mask_lr: "same as lr", target_krr: "no budget" };
const LABELS = { target_krr: "kernel budget (target KRR)" };

async function pageJobs() {
  const err = errorBox();
  const listBox = h("div", {}, h("p", { class: "muted" }, "loading…"));
  const formBox = needs("write", h("section", { id: "submit-job" }));
  fill(main, h("h1", {}, "Jobs"), err, formBox, h("h2", {}, "Recent jobs"), listBox);
  const refresh = async () => {
    try {
      const page = await api(`jobs${qs({ limit: 30 })}`);
      fill(listBox, page.items.length ? table([
        { label: "Job", get: (j) => h("a", { href: `#/jobs/${j.id}` }, j.id.slice(0, 8)) },
        { label: "Status", get: (j) => statusBadge(j.status) },
        { label: "Dataset", get: (j) => `${j.dataset ?? "–"} / ${j.arch ?? "–"}`, narrow: false },
        { label: "Progress", get: (j) => progressBar(j.percent) },
        { label: "ETA", get: (j) => (["queued", "running"].includes(j.status) ? secs(j.eta_s) : "–") },
        { label: "Model", get: (j) => (j.model_id ? h("a", { href: `#/models/${j.model_id}` }, `#${j.model_id}`) : "–") },
      ], page.items, (j) => { location.hash = `#/jobs/${j.id}`; }) : h("p", { class: "muted" }, "No jobs yet."));
    } catch (e) { showError(err, e); }
  };
  await refresh();
  const timer = setInterval(refresh, 3000);
  state.cleanup.push(() => clearInterval(timer));
  if (!state.scopes.has("write")) return;
  try {
    const [props, datasets, archs] = await Promise.all([jobSchema(), api("datasets"), api("architectures")]);
    const inputs = {};
    const field = (name) => {
      const p = props[name]; const def = p.default;
      let input;
      if (name === "dataset") input = h("select", {}, datasets.filter((d) => d.available).map((d) => h("option", { value: d.name, selected: d.name === def }, d.name)));
      else if (name === "arch") input = h("select", {}, archs.map((a) => h("option", { value: a.name, selected: a.name === def }, a.name)));
      else if (typeof def === "boolean") {
        input = h("input", { type: "checkbox" }); input.checked = def;
        inputs[name] = input;
        return h("label", { class: "check", title: p.description || "" }, input, name);
      } else {
        const isInt = p.type === "integer";
        const blank = def === null || def === undefined;
        input = h("input", { type: name === "name" ? "text" : "number", step: isInt ? "1" : "any", value: blank ? "" : def, placeholder: blank ? NULL_MEANS[name] || "default" : null });
      }
      input.name = name; inputs[name] = input;
      return h("label", { title: p.description || "" }, LABELS[name] || name.replace("_", " "), input);
    };
    const ferr = errorBox();
    const form = h("form", { class: "grid", id: "job-form", onsubmit: async (ev) => {
      ev.preventDefault(); hideError(ferr);
      const body = {};
      for (const [k, input] of Object.entries(inputs)) {
        if (input.type === "checkbox") body[k] = input.checked;
        else if (input.value === "") continue; // server default
        else if (input.type === "number") body[k] = Number(input.value);
        else body[k] = input.value;
      }
      try {
        const job = await api("jobs", { method: "POST", body });
        location.hash = `#/jobs/${job.id}`;
      } catch (e) { showError(ferr, e); }
    } }, JOB_FIELDS.filter((f) => props[f]).map(field), h("button", { type: "submit" }, "Submit job"));
    fill(formBox, h("h2", {}, "Train a model"),
      h("p", { class: "muted" }, "Defaults come from the API schema, the same for every data set. A few epochs are enough to try things out."), form, ferr);
  } catch (e) { showError(err, e); }
}

const CURVES = {
  loss: { title: "Loss and its parts", y: "loss", keys: ["loss", "ce", "cohesion_loss", "coupling_loss"] },
  acc: { title: "Accuracy", y: "accuracy", keys: ["train_acc", "val_acc", "test_acc"], yMin: 0, yMax: 1 },
  kr: { title: "Kernel rate and budget", y: "kept fraction", keys: ["kernel_rate", "kernel_budget"], yMin: 0, yMax: 1 },
};
// Curves from progress records: x = epochs done (fractional within an epoch).
function curveBox(records, id) {
  const box = h("div", { class: "cards", id });
  const draw = () => {
    fill(box, ...Object.entries(CURVES).map(([k, c]) => h("div", { class: "card", "data-curve": k }, lineChart(
      c.keys.map((key) => ({ name: key, points: records.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => [r.x, r[key]]) }))
        .filter((s) => s.points.length || c.keys.length === 1),
      { title: c.title, xLabel: "epoch", yLabel: c.y, xMin: 0, yMin: c.yMin, yMax: c.yMax }))));
  };
  draw();
  return { box, draw };
}
// A model that ended failed or cancelled gave its version number back (version null).
function modelLabel(m) { return m.version == null ? `${m.name} (${m.status})` : `${m.name} v${m.version}`; }
function historyRecords(history) { return history.map((r) => ({ ...r, x: r.epoch })); }

async function pageJob(id) {
  const err = errorBox();
  const head = h("div");
  const records = [];
  const curves = curveBox(records, "job-curves");
  fill(main, h("h1", {}, "Job ", h("code", {}, id.slice(0, 8))), err, head, h("h2", {}, "Training curves"), curves.box);
  let job;
  try { job = await api(`jobs/${encodeURIComponent(id)}`); } catch (e) { showError(err, e); return; }
  const drawHead = (j) => {
    const active = ["queued", "running"].includes(j.status);
    const cancel = needs("write", h("button", { type: "button", class: "secondary", id: "cancel-job", disabled: !active || j.cancel_requested, onclick: async () => {
      hideError(err);
      try { drawHead(await api(`jobs/${id}/cancel`, { method: "POST" })); } catch (e) { showError(err, e); }
    } }, j.cancel_requested ? "Cancelling…" : "Cancel"));
    const p = j.progress || {};
    fill(head, h("div", { class: "row" }, h("span", { class: `status ${j.status}`, id: "job-status", "data-status": j.status }, j.status),
      h("div", { style: "flex:1;min-width:120px" }, progressBar(j.percent)), h("span", {}, j.percent != null ? `${j.percent.toFixed(0)}%` : ""), active ? cancel : null),
    kv([["dataset / arch", `${j.dataset} / ${j.arch}`], ["phase", p.phase || "–"], ["epoch", p.epoch ? `${p.epoch} / ${p.epochs}` : "–"],
      ["ETA", active ? `${secs(j.eta_s)}${j.eta_at ? ` (${new Date(j.eta_at).toLocaleTimeString()})` : ""}` : "–"],
      ["elapsed", secs(j.duration_s ?? p.elapsed_s)], ["attempts", `${j.attempts} / ${j.max_attempts}`],
      ["model", j.model_id ? h("a", { href: `#/models/${j.model_id}`, id: "job-model-link" }, `model #${j.model_id}`) : "–"],
      ["error", j.error ? h("span", { class: "error" }, j.error) : "–"],
      ["parameters", h("code", {}, Object.entries(j.params || {}).filter(([k]) => !["tags"].includes(k)).map(([k, v]) => `${k}=${v}`).join(" "))]]));
  };
  drawHead(job);
  const addProgress = (j) => {
    const p = j.progress;
    if (!p || p.epoch == null || p.phase === "saving") return;
    const x = p.steps ? p.epoch - 1 + p.step / p.steps : p.epoch;
    const last = records[records.length - 1];
    if (last && last.x === x) Object.assign(last, p); else if (!last || x > last.x) records.push({ ...p, x });
    curves.draw();
  };
  const finish = async (j) => {
    if (j.model_id) {  // the full per-epoch history, kept in the model's manifest
      try {
        const ins = await api(`models/${j.model_id}/insights`);
        // Merge the per-epoch records (with test accuracy) into the live points.
        for (const r of historyRecords(ins.history)) {
          const same = records.find((x) => Math.abs(x.x - r.x) < 1e-9);
          if (same) Object.assign(same, r); else records.push(r);
        }
        records.sort((a, b) => a.x - b.x);
        curves.draw();
      } catch { /* the live points stay */ }
    }
  };
  if (["queued", "running"].includes(job.status)) {
    const ctrl = followEvents(id, (name, data) => {
      drawHead(data); addProgress(data);
      if (name === "end") finish(data);
    }, (e) => showError(err, e));
    state.cleanup.push(() => ctrl.abort());
  } else { addProgress(job); await finish(job); }
}

// ---------- Lists with a filter form (models, modules) ----------
// One shape for every filtered list: a form of inputs named as the API's query parameters, a
// request per submit (an older answer arriving late is dropped), a table or an empty message.
function filteredList({ resource, fields, columns, empty, button, formId, link, counted }) {
  const err = errorBox();
  const listBox = h("div");
  let seq = 0;
  const load = async () => {
    hideError(err);
    const mine = ++seq;
    try {
      const params = Object.fromEntries(Object.entries(fields).map(([k, i]) => [k, i.value]));
      const page = await api(`${resource}${qs({ ...params, limit: 100 })}`);
      if (mine !== seq) return; // a newer filter was applied meanwhile
      const rows = page.items.length
        ? table(columns, page.items, (x) => { location.hash = link(x); })
        : h("p", { class: "muted" }, empty);
      if (counted) fill(listBox, h("p", { class: "muted" }, `${page.total ?? page.items.length} ${resource.replace(/s$/, "")}(s)`), rows);
      else fill(listBox, rows);
    } catch (e) { showError(err, e); }
  };
  const form = h("form", { class: "grid", ...(formId ? { id: formId } : {}), onsubmit: (ev) => { ev.preventDefault(); load(); } },
    Object.entries(fields).map(([k, i]) => h("label", {}, k.replace("_", " "), i)), h("button", { type: "submit" }, button));
  return { form, err, listBox, load };
}

// ---------- Models ----------
async function pageModels() {
  const fields = { dataset: h("input", { name: "dataset", placeholder: "any" }), name: h("input", { name: "name", placeholder: "any" }),
    min_accuracy: h("input", { name: "min_accuracy", type: "number", step: "any", min: 0, max: 1, placeholder: "0–1" }),
    max_krr: h("input", { name: "max_krr", type: "number", step: "any", min: 0, max: 1, placeholder: "0–1" }),
    status: h("select", { name: "status" }, ["ready", "pending", "failed", "cancelled", "any"].map((s) => h("option", { value: s }, s))),
    sort: h("select", { name: "sort" }, ["-created", "-accuracy", "krr", "-version"].map((s) => h("option", { value: s }, s))) };
  const list = filteredList({ resource: "models", fields, empty: "No model matches.", button: "Filter",
    link: (m) => `#/models/${m.id}`, columns: [
      { label: "Model", get: (m) => h("a", { href: `#/models/${m.id}` }, `${modelLabel(m)}`) },
      { label: "Status", get: (m) => statusBadge(m.status), narrow: false },
      { label: "Dataset", get: (m) => `${m.dataset} / ${m.arch}` },
      { label: "Accuracy", get: (m) => pct(m.accuracy) },
      { label: "KRR", get: (m) => pct(m.krr) },
      { label: "Params", get: (m) => num(m.params), narrow: false },
      { label: "Tags", get: (m) => Object.entries(m.tags).map(([k, v]) => `${k}=${v}`).join(" "), narrow: false },
    ] });
  fill(main, h("h1", {}, "Models"), list.form, list.err, list.listBox);
  await list.load();
}

function modularityFigures(ins) {
  const out = [];
  if (ins.kept) {
    out.push(h("div", { class: "card wide", id: "kept-heatmap" }, heatmap(ins.class_names, ins.layers,
      ins.kept.map((row) => row.map((k, l) => k / ins.layer_kernels[l])),
      { title: "Kernels kept per class and layer", xLabel: "layer (kernels kept / total)", yLabel: "class",
        text: ins.kept, legend: "kept fraction" }),
    h("p", { class: "muted" }, `Layer sizes: ${ins.layers.map((l, i) => `${l}=${ins.layer_kernels[i]}`).join(", ")}; τ = ${ins.tau}.`)));
    out.push(h("div", { class: "card wide", id: "coupling-matrix" }, heatmap(ins.class_names, ins.class_names, ins.coupling,
      { title: "Coupling: kernels shared by two classes' modules", xLabel: "class", yLabel: "class",
        text: ins.coupling.map((r) => r.map((v) => v.toFixed(2))), legend: "Jaccard overlap" })));
  }
  return out;
}

async function pageModel(id) {
  const err = errorBox();
  fill(main, h("h1", {}, `Model #${id}`), err);
  let m;
  try { m = await api(`models/${id}`); } catch (e) { showError(err, e); return; }
  let ins = null;
  try { ins = await api(`models/${id}/insights`); } catch (e) { if (m.status === "ready") showError(err, e); }
  const dl = downloadArea();
  const tags = Object.entries(m.tags);
  const figs = [];
  if (ins && ins.class_recall) {
    figs.push(h("div", { class: "card", id: "class-accuracy" }, barChart(ins.class_names, [{ name: "test accuracy", values: ins.class_recall }],
      { title: "Per-class test accuracy", yLabel: "accuracy", yMax: 1 })));
  }
  if (ins && ins.history.length) {
    const rec = historyRecords(ins.history);
    figs.push(...Object.values(CURVES).map((c) => h("div", { class: "card" }, lineChart(c.keys.map((k) => ({ name: k, points: rec.filter((r) => r[k] != null).map((r) => [r.x, r[k]]) })),
      { title: c.title, xLabel: "epoch", yLabel: c.y, xMin: 0, yMin: c.yMin, yMax: c.yMax }))));
  }
  if (ins) figs.push(...modularityFigures(ins));
  fill(main, 
    h("h1", {}, `${modelLabel(m)} `, statusBadge(m.status)), err,
    h("div", { class: "cards" },
      h("div", { class: "card", id: "model-metrics" }, h("h2", {}, "Metrics"), kv([
        ["test accuracy", pct(m.accuracy)], ["validation accuracy", pct(m.metrics?.val_acc)],
        ["KRR (kernel retention)", pct(m.krr)], ["kernel budget", h("span", { id: "model-budget" }, budgetText(m.metrics?.kernel_budget))],
        ["cohesion", m.cohesion?.toFixed(3)],
        ["coupling", m.coupling?.toFixed(3)], ["params", num(m.params)], ["FLOPs", num(m.flops)],
        ["train time", secs(m.train_seconds)], ["epochs", m.epochs], ["classes", m.num_classes]])),
      h("div", { class: "card" }, h("h2", {}, "Lineage"), kv([
        ["job", m.job_id ? h("a", { href: `#/jobs/${m.job_id}` }, m.job_id.slice(0, 8)) : "–"],
        ["dataset", h("a", { href: `#/datasets/${encodeURIComponent(m.dataset)}` }, m.dataset)],
        ["architecture", `${m.arch} ×${m.width}`], ["modular", m.modular ? `yes (τ = ${m.tau})` : "no"],
        ["base weights", m.config.init_from || m.config.base_model || "none (trained from scratch)"],
        ["compositions", m.compositions.length ? m.compositions.map((c) => `#${c}`).join(", ") : "–"],
        ["created", new Date(m.created_at).toLocaleString()], ["tags", tags.length ? tags.map(([k, v]) => `${k}=${v}`).join(", ") : "–"]])),
      h("div", { class: "card" }, h("h2", {}, "Download"), kv([["sha256", h("code", {}, m.sha256 || "–")], ["size", m.size_bytes ? `${num(m.size_bytes)} bytes` : "–"]]),
        m.sha256 ? h("div", { class: "row" }, await downloadButton("Download .tar", `${API}/models/${id}/download`, m.sha256, dl),
          await downloadButton("ONNX", `${API}/models/${id}/export?format=onnx`, null, dl)) : null, dl.msg, dl.err)),
    figs.length ? h("h2", {}, "Figures") : null, h("div", { class: "cards" }, figs),
    m.modules.length ? h("h2", {}, "Modules") : null,
    m.modules.length ? table([
      { label: "Class", get: (x) => h("a", { href: `#/modules/${x.id}` }, x.class_name) },
      { label: "Accuracy", get: (x) => pct(x.accuracy) }, { label: "KRR", get: (x) => pct(x.krr) },
      { label: "Kernels", get: (x) => `${x.kept_kernels} / ${x.total_kernels}` }, { label: "Params", get: (x) => num(x.params), narrow: false },
    ], m.modules, (x) => { location.hash = `#/modules/${x.id}`; }) : null,
    h("h2", {}, "Training configuration"), h("pre", {}, JSON.stringify(m.config, null, 2)));
}

// ---------- Modules ----------
async function pageModules() {
  const hp = new URLSearchParams(location.hash.split("?")[1] || "");
  const fields = { dataset: h("input", { name: "dataset", placeholder: "any", value: hp.get("dataset") || "" }),
    class_name: h("input", { name: "class_name", placeholder: "e.g. 3", value: hp.get("class_name") || "" }),
    max_krr: h("input", { name: "max_krr", type: "number", step: "any", placeholder: "0–1" }),
    min_accuracy: h("input", { name: "min_accuracy", type: "number", step: "any", placeholder: "0–1" }),
    sort: h("select", { name: "sort" }, ["-accuracy", "krr", "-created", "id"].map((s) => h("option", { value: s }, s))) };
  const list = filteredList({ resource: "modules", fields, empty: "No module matches.", button: "Search",
    formId: "module-search", counted: true, link: (x) => `#/modules/${x.id}`, columns: [
      { label: "Module", get: (x) => h("a", { href: `#/modules/${x.id}` }, `#${x.id}`) },
      { label: "Class", get: (x) => x.class_name },
      { label: "Dataset", get: (x) => `${x.dataset} / ${x.arch}`, narrow: false },
      { label: "Model", get: (x) => h("a", { href: `#/models/${x.model_id}` }, `#${x.model_id}`) },
      { label: "Accuracy", get: (x) => pct(x.accuracy) }, { label: "KRR", get: (x) => pct(x.krr) },
      { label: "Params", get: (x) => num(x.params), narrow: false },
    ] });
  fill(main, h("h1", {}, "Modules"), h("p", { class: "muted" }, "Each module is the part of a model that recognises one class."), list.form, list.err, list.listBox);
  await list.load();
}

function predictZone(kind, id) {
  const err = errorBox();
  const out = h("div", { class: "predict-result" });
  const input = h("input", { type: "file", accept: "image/png,image/jpeg", multiple: true, "aria-label": "image files" });
  const run = async (files) => {
    hideError(err); out.textContent = "classifying…";
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    try {
      const r = await api(`${kind}/${id}/predict${qs({ top_k: 3 })}`, { method: "POST", form });
      fill(out, table([{ label: "Image", get: (p) => p.input },
        { label: "Prediction", get: (p) => p.top.map((t) => `${t.class_name} (${(100 * t.probability).toFixed(1)}%)`).join(", ") }], r.predictions));
    } catch (e) { out.textContent = ""; showError(err, e); }
  };
  const zone = h("div", { class: "drop", id: "drop-zone",
    ondragover: (e) => { e.preventDefault(); zone.classList.add("over"); },
    ondragleave: () => zone.classList.remove("over"),
    ondrop: (e) => { e.preventDefault(); zone.classList.remove("over"); run([...e.dataTransfer.files]); } },
  "Drop PNG or JPEG images here, or ", input);
  input.addEventListener("change", () => input.files.length && run([...input.files]));
  return h("div", { class: "card" }, h("h2", {}, "Try it"), zone, err, out);
}

async function pageModule(id) {
  const err = errorBox();
  fill(main, h("h1", {}, `Module #${id}`), err);
  let x;
  try { x = await api(`modules/${id}`); } catch (e) { showError(err, e); return; }
  let ins = null;
  try { ins = await api(`models/${x.model_id}/insights`); } catch (e) { showError(err, e); }
  const dl = downloadArea();
  const perLayer = ins && ins.kept ? h("div", { class: "card", id: "module-layers" }, barChart(ins.layers,
    [{ name: "kept", values: ins.kept[x.class_index] }, { name: "total", values: ins.layer_kernels }],
    { title: "Kernels per layer", yLabel: "kernels" })) : null;
  fill(main, h("h1", {}, `Module: class “${x.class_name}” of model #${x.model_id}`), err,
    h("div", { class: "cards" },
      h("div", { class: "card", id: "module-card" }, kv([
        ["class", `${x.class_name} (index ${x.class_index})`], ["dataset / arch", `${x.dataset} / ${x.arch}`],
        ["model", h("a", { href: `#/models/${x.model_id}` }, `#${x.model_id}`)],
        ["accuracy (this class)", pct(x.accuracy)], ["KRR", pct(x.krr)], ["cohesion", x.cohesion?.toFixed(3)],
        ["kernels kept", `${num(x.kept_kernels)} / ${num(x.total_kernels)}`], ["params", num(x.params)], ["FLOPs", num(x.flops)],
        ["CPU latency", h("span", { id: "module-latency" }, latencyText(x))],
        ["size", `${num(x.size_bytes)} bytes`], ["sha256", h("code", { id: "module-sha" }, x.sha256)]]),
      h("div", { class: "row" }, await downloadButton("Download module", `${API}/modules/${id}/download`, x.sha256, dl),
        await downloadButton("TorchScript", `${API}/modules/${id}/export?format=torchscript`, null, dl)), dl.msg, dl.err),
      perLayer, predictZone("modules", id)));
}

// A module's CPU time per image beside its model's, timed together at export (batch 64).
function latencyText(x) {
  if (x.latency_ms == null) return "not timed";
  const full = x.full_latency_ms;
  return full ? `${x.latency_ms.toFixed(3)} ms/image (model ${full.toFixed(3)} ms, ${(x.latency_ms / full).toFixed(2)}x)`
    : `${x.latency_ms.toFixed(3)} ms/image`;
}

// ---------- Compose ----------
async function pageCompose() {
  const err = errorBox();
  fill(main, h("h1", {}, "Compose a classifier"), err);
  let models;
  try { models = (await api(`models${qs({ status: "ready", limit: 100, sort: "-created" })}`)).items.filter((m) => m.modular); } catch (e) { showError(err, e); return; }
  if (!models.length) { main.append(h("p", { class: "muted" }, "No modular model is ready yet: train one on the Jobs page.")); return; }
  const picks = new Map(); // model id -> Set of class indices, in click order
  const pickerBox = h("div", { id: "picker" });
  const summary = h("p", { class: "muted", id: "pick-summary" });
  const updateSummary = () => {
    const parts = [...picks.entries()].filter(([, s]) => s.size).map(([mid, s]) => { const m = models.find((x) => x.id === mid); return `${modelLabel(m)}: ${[...s].map((c) => m.class_names[c]).join(", ")}`; });
    summary.textContent = parts.length ? `Chosen — ${parts.join(" · ")}` : "Pick two or more classes.";
  };
  for (const m of models.slice(0, 12)) {
    picks.set(m.id, new Set());
    pickerBox.append(h("details", { class: "card", open: m === models[0] ? true : null, "data-model": m.id },
      h("summary", {}, `${modelLabel(m)} — ${m.dataset}, accuracy ${pct(m.accuracy)}`),
      h("div", { class: "picker" }, m.class_names.map((c, i) => h("label", { class: "check" },
        h("input", { type: "checkbox", value: i, "data-class": c, onchange: (e) => { if (e.target.checked) picks.get(m.id).add(i); else picks.get(m.id).delete(i); updateSummary(); } }), c)))));
  }
  updateSummary();
  const result = h("div", { id: "composition" });
  const cerr = errorBox();
  const go = needs("write", h("button", { type: "button", id: "compose-btn", onclick: async () => {
    hideError(cerr); fill(result, h("p", { class: "muted" }, "composing and measuring on the test split…"));
    const sources = [...picks.entries()].filter(([, s]) => s.size).map(([model_id, s]) => ({ model_id, classes: [...s] }));
    try {
      if (!sources.length) throw new ApiError(0, "pick at least one class first");
      const body = sources.length === 1 ? { model_id: sources[0].model_id, classes: sources[0].classes } : { sources };
      const c = await api("compositions", { method: "POST", body });
      await showComposition(c, result, models);
    } catch (e) { fill(result, ); showError(cerr, e); }
  } }, "Compose"));
  main.append(h("p", { class: "muted" }, "Pick classes from one model (its modules are cut out, no training) or from several (their logits are calibrated)."),
    pickerBox, summary, go, cerr, result);
}

// How the module's threshold was decided (metrics.tau_mode: auto, fixed or the model's own).
function tauText(c) {
  const m = c.metrics || {};
  if (m.tau_mode === "auto") return `${c.tau} (chosen: validation accuracy ${pct(m.module_val_acc)} vs ${pct(m.full_val_acc)}, margin ${c.margin_pp} pts${m.met_margin ? "" : ", not met"})`;
  return `${c.tau} (${m.tau_mode === "fixed" ? "given" : "the model's own"})`;
}

async function showComposition(c, box, models) {
  const dl = downloadArea();
  const srcModels = c.sources.map((s) => models.find((m) => m.id === s.model_id)).filter(Boolean);
  const srcParams = srcModels.reduce((a, m) => a + (m.params || 0), 0);
  const srcFlops = srcModels.reduce((a, m) => a + (m.flops || 0), 0);
  fill(box, h("h2", {}, `Composition #${c.id}: ${c.class_names.join(", ")}`),
    h("div", { class: "cards" },
      h("div", { class: "card", id: "composition-card" }, kv([
        ["accuracy", h("strong", { id: "composition-accuracy" }, pct(c.accuracy))],
        ["baseline accuracy", pct(c.baseline_accuracy)], ["accuracy change", c.accuracy_loss != null ? `${(-100 * c.accuracy_loss).toFixed(1)} pts` : "–"],
        ["KRR", pct(c.krr)], ...(c.tau != null ? [["tau", tauText(c)]] : []), ["params", `${num(c.params)} (source models: ${num(srcParams)})`], ["FLOPs", `${num(c.flops)} (source models: ${num(srcFlops)})`],
        ["sha256", h("code", {}, c.sha256 || "–")]]),
      h("p", { class: "muted" }, "Baseline: the source model(s) on the same test images, predicting among the chosen classes only."),
      h("div", { class: "row" }, c.sha256 ? await downloadButton("Download .tar", `${API}/compositions/${c.id}/download`, c.sha256, dl) : null,
        await downloadButton("ONNX", `${API}/compositions/${c.id}/export?format=onnx`, null, dl),
        await downloadButton("TorchScript", `${API}/compositions/${c.id}/export?format=torchscript`, null, dl)), dl.msg, dl.err),
      h("div", { class: "card" }, barChart(["accuracy", "params (rel.)", "FLOPs (rel.)"], [
        { name: "composition", values: [c.accuracy, srcParams ? c.params / srcParams : NaN, srcFlops ? c.flops / srcFlops : NaN] },
        { name: "baseline", values: [c.baseline_accuracy, 1, 1] }], { title: "Composition vs baseline", yMax: Math.max(1, c.accuracy || 0) })),
      predictZone("compositions", c.id)));
}

// ---------- Datasets ----------
async function pageDatasets(name) {
  const err = errorBox();
  const listBox = h("div");
  const samples = h("div", { id: "samples" });
  const uerr = errorBox();
  const bar = h("div", { class: "progress" }, h("div", { style: "width:0%" }));
  const file = h("input", { type: "file", accept: ".npz", name: "file", required: true });
  const dname = h("input", { name: "name", placeholder: "default: file name" });
  const umsg = h("span", { class: "muted" });
  const uploadForm = needs("write", h("form", { class: "grid", id: "upload-form", onsubmit: async (ev) => {
    ev.preventDefault(); hideError(uerr);
    const form = new FormData(); form.append("file", file.files[0]); if (dname.value) form.append("name", dname.value);
    try {
      const d = await upload(`${API}/datasets`, form, (f) => { bar.firstChild.style.width = `${(100 * f).toFixed(0)}%`; umsg.textContent = `${(100 * f).toFixed(0)}% sent`; });
      umsg.textContent = `uploaded ${d.name}: ${d.num_classes} classes, ${num(d.train_size)} train / ${num(d.test_size)} test images`;
      load();
    } catch (e) { umsg.textContent = ""; showError(uerr, e); }
  } }, h("label", {}, ".npz file", file), h("label", {}, "name", dname), h("button", { type: "submit" }, "Upload"), bar));
  const load = async () => {
    try {
      const ds = await api("datasets");
      fill(listBox, table([
        { label: "Dataset", get: (d) => h("a", { href: `#/datasets/${encodeURIComponent(d.name)}` }, d.name) },
        { label: "Source", get: (d) => d.source, narrow: false },
        { label: "Classes", get: (d) => d.num_classes },
        { label: "Images", get: (d) => `${d.channels}×${d.input_size}²` },
        { label: "Train / test", get: (d) => (d.train_size ? `${num(d.train_size)} / ${num(d.test_size)}` : "–"), narrow: false },
        { label: "Available", get: (d) => (d.available ? "yes" : h("span", { title: d.hint || "" }, "no")) },
      ], ds, (d) => { location.hash = `#/datasets/${encodeURIComponent(d.name)}`; }));
    } catch (e) { showError(err, e); }
  };
  fill(main, h("h1", {}, "Datasets"), err, listBox, samples,
    h("h2", { class: state.scopes.has("write") ? null : "hidden-by-scope" }, "Upload a dataset"), uploadForm, umsg, uerr);
  await load();
  if (name) {
    fill(samples, h("p", { class: "muted" }, "loading samples…"));
    try {
      const s = await api(`datasets/${encodeURIComponent(name)}/samples${qs({ per_class: 8 })}`);
      fill(samples, h("h2", {}, `${s.dataset}: test images per class`), h("div", { class: "samples card" },
        s.class_names.flatMap((c, i) => [h("strong", {}, c), h("div", {}, s.images[i].map((src) => h("img", { src, alt: `class ${c}` })))])),
      s.truncated ? h("p", { class: "muted" }, "Only the first classes are shown.") : null);
    } catch (e) { fill(samples, ); showError(err, e); }
  }
}

// ---------- router ----------
const ROUTES = [
  [/^#\/jobs\/([\w-]+)$/, (m) => pageJob(m[1])],
  [/^#\/models\/(\d+)$/, (m) => pageModel(m[1])],
  [/^#\/models/, () => pageModels()],
  [/^#\/modules\/(\d+)$/, (m) => pageModule(m[1])],
  [/^#\/modules/, () => pageModules()],
  [/^#\/compose/, () => pageCompose()],
  [/^#\/datasets\/([^/?]+)$/, (m) => pageDatasets(decodeURIComponent(m[1]))],
  [/^#\/datasets/, () => pageDatasets()],
  [/^/, () => pageJobs()],
];
async function route() {
  state.cleanup.splice(0).forEach((f) => f());
  if (!getKey()) { renderLogin(); return; }
  if (!state.scopes.size) {
    try { await whoami(); } catch (e) { clearKey(); renderLogin(e); return; }
  }
  const hash = location.hash || "#/jobs";
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", hash.startsWith(a.getAttribute("href"))));
  for (const [re, fn] of ROUTES) {
    const m = re.exec(hash);
    if (m) {
      try { await fn(m); } catch (e) { const b = errorBox(); main.prepend(b); showError(b, e); }
      return;
    }
  }
}
window.addEventListener("hashchange", route);
route();
