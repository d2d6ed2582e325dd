// The page: config form, run controls, live status, charts, samples, checkpoints. Wired to the server's JSON
// API and its server-sent events; no inline scripts (the Content-Security-Policy forbids them).

import { authIsRequired, copyText, download, el, formatBytes, formatDate, formatNumber, getJSON, load, send,
  setAuthRequired, toast } from "./api.js";
import { Charts, RunCurves } from "./charts.js";
import { renderSample } from "./grids.js";
import { renderLanguage } from "./language.js";

const $ = (id) => document.getElementById(id);
const ACTIVE_PHASES = ["pretraining", "training", "stopping"];
const RUNNING_PHASES = ["pretraining", "training"];
const DISK_MARGIN = 1.2; // a save needs this many times its estimated size free
const COMMAND_TOAST_MS = 15_000; // long enough to read, or copy by hand, a command line
const FINAL_KINDS = ["interrupted", "error"]; // the checkpoint a run leaves where it was stopped or failed
const GROUPS = [
  ["Task", ["task_type", "bottleneck_type", "num_distractors", "use_input_output_pairs"]],
  ["Message", ["vocab_size", "max_message_length", "temperature", "temperature_decay", "min_temperature"]],
  ["Model", ["latent_dim", "hidden_dim", "cell_channels", "pattern_buckets", "pattern_kinds"]],
  ["Optimisation", ["epochs", "batch_size", "learning_rate"]],
  ["Speed", ["precision", "compile"]],
  ["Pretraining", ["pretrain_mode", "pretrained_encoder", "freeze_encoder"]],
];
const SERVER_FIXED = new Set(["checkpoint_dir"]); // shown, never sent: the server owns its folder

const state = {
  status: { phase: "idle" },
  fields: [],
  defaults: {},
  presets: [],
  checkpoints: [],
  runs: [], // from /runs: newest first, the legacy flat folder last
  shownRun: null, // the current run the table was last grouped for
  compare: { a: null, b: null },
  samples: { train: null, val: null },
};
const charts = new Charts({ loss: $("chart-loss"), acc: $("chart-acc"), temperature: $("chart-temperature") });

// ---------------------------------------------------------------------------------------------- config form

function fieldInput(field, value) {
  const id = `cfg-${field.name}`;
  if (field.name === "pretrained_encoder") {
    return el("select", { id, name: field.name }, el("option", { value: "" }, "none"));
  }
  if (field.choices) {
    return el("select", { id, name: field.name },
      ...field.choices.map((c) => el("option", { value: c, selected: c === value }, String(c))));
  }
  if (field.type === "bool") return el("input", { id, name: field.name, type: "checkbox", checked: Boolean(value) });
  if (field.type === "int" || field.type === "float") {
    return el("input", { id, name: field.name, type: "number", value: String(value), min: field.low ?? undefined,
      max: field.high ?? undefined, step: field.type === "int" ? "1" : "any" });
  }
  return el("input", { id, name: field.name, type: "text", value: value ?? "", disabled: SERVER_FIXED.has(field.name) });
}

function fieldRow(field, value) {
  const input = fieldInput(field, value);
  const label = el("label", { for: input.id }, field.name.replaceAll("_", " "));
  input.setAttribute("aria-description", field.help || "");
  return el("div", { className: `field field-${field.type}`, title: field.help || "" }, label, input);
}

function buildForm(fields, defaults) {
  state.fields = fields;
  state.defaults = defaults;
  const byName = new Map(fields.map((f) => [f.name, f]));
  const grouped = new Set(GROUPS.flatMap(([, names]) => names));
  const groups = GROUPS.map(([title, names]) => {
    const rows = names.filter((n) => byName.has(n)).map((n) => fieldRow(byName.get(n), defaults[n]));
    return rows.length ? el("fieldset", {}, el("legend", {}, title), ...rows) : null;
  });
  $("config-groups").replaceChildren(...groups.filter(Boolean));
  $("config-advanced").replaceChildren(
    ...fields.filter((f) => !grouped.has(f.name)).map((f) => fieldRow(f, defaults[f.name])));
}

function fieldValue(field, input) {
  if (field.type === "bool") return input.checked;
  if (field.type === "int" || field.type === "float") {
    const number = Number(input.value);
    // a non-number goes to the server as typed, so its 400 names the field and the value
    return input.value.trim() !== "" && Number.isFinite(number) ? number : input.value;
  }
  return input.value;
}

/** Show a value in a field's input; a value the input cannot show (a choice it lacks) leaves it as it is. */
function setField(field, value) {
  const input = $(`cfg-${field.name}`);
  if (!input || SERVER_FIXED.has(field.name) || value === undefined) return;
  if (field.type === "bool") input.checked = Boolean(value);
  else if (input.tagName !== "SELECT") input.value = value ?? "";
  else if ([...input.options].some((o) => o.value === String(value ?? ""))) input.value = String(value ?? "");
}

/** Fill the form with these settings; fields they do not name keep what they show. */
function fillForm(values) {
  for (const field of state.fields) if (field.name in values) setField(field, values[field.name]);
}

/** The settings to show on load: the current or last run of this server, else the newest run on disk; null for
 * none (the form keeps the defaults). Returns [config, where it came from]. */
function lastSettings(status, runs) {
  if (status.config) return [status.config, `run ${status.run_id}`];
  const newest = runs.find((r) => !r.legacy && !r.refused && r.config);
  return newest ? [newest.config, `run ${newest.run_id}`] : [null, ""];
}

/** On load, the form shows the settings of the last run rather than the defaults. */
function showLastSettings(status) {
  const [settings, source] = lastSettings(status, state.runs);
  if (!settings) return;
  fillForm(settings);
  $("config-source").textContent = `filled from ${source}`;
}

// ---------------------------------------------------------------------------------------------- presets

/** The preset menu, when the server offers presets. */
function buildPresets(presets) {
  state.presets = Array.isArray(presets) ? presets.filter((p) => p && p.name && p.values) : [];
  $("presets").hidden = state.presets.length === 0;
  $("preset").replaceChildren(el("option", { value: "" }, "choose…"),
    ...state.presets.map((p) => el("option", { value: p.name }, p.title || p.name)));
}

/** A preset sets the fields it names; every other field goes back to its default. */
function choosePreset() {
  const preset = state.presets.find((p) => p.name === $("preset").value);
  $("preset-description").textContent = preset ? preset.description || "" : "";
  if (!preset) return;
  fillForm({ ...state.defaults, ...preset.values });
  $("config-source").textContent = `filled from the preset “${preset.title || preset.name}”`;
}

/** Every form field's value, typed; fields the server fixes are left out. */
function readForm() {
  const config = {};
  for (const field of state.fields) {
    const input = $(`cfg-${field.name}`);
    if (input && !SERVER_FIXED.has(field.name)) config[field.name] = fieldValue(field, input);
  }
  return config;
}

/** Pretrained encoders by id; the label names the run, since two runs may each hold one of the same name. */
function fillPretrainedSelect(checkpoints) {
  const select = $("cfg-pretrained_encoder");
  if (!select) return;
  const current = select.value;
  const encoders = checkpoints.filter((c) => c.kind === "pretrained" && usable(c) && !c.damaged);
  select.replaceChildren(el("option", { value: "" }, "none"),
    ...encoders.map((c) => el("option", { value: c.id, selected: c.id === current }, `${c.name} · run ${c.run_id}`)));
}

// ---------------------------------------------------------------------------------------------- run controls

async function startPretraining() {
  const config = readForm();
  delete config.pretrained_encoder; // main training only
  const result = await send("POST", "/start_pretraining",
    { ...config, mode: config.pretrain_mode, processes: processes() });
  if (result.ok) toast(`Pretraining (${config.pretrain_mode}) started: run ${result.data.run_id}`, "info");
}

async function startTraining(extra = {}, message = "Training started") {
  const body = { ...("resume_from" in extra ? extra : { ...readForm(), ...extra }), processes: processes() };
  const result = await send("POST", "/start_training", body);
  if (result.ok) toast(`${message}: run ${result.data.run_id}`, "info");
}

/** The processes field: a number, or the text typed (the server's 400 then names it). */
function processes() {
  const input = $("processes");
  const number = Number(input.value);
  return Number.isInteger(number) ? number : input.value;
}

/** The processes field shows the server's default (app.py --nproc-per-node) and its bounds. */
function setProcesses(bounds) {
  if (!bounds) return;
  const input = $("processes");
  input.min = bounds.low;
  input.max = bounds.high;
  input.value = bounds.default;
}

async function control(url) {
  await send("POST", url);
}

function pauseOrResume() {
  control(state.status.paused ? "/resume_training" : "/pause");
}

// ---------------------------------------------------------------------------------------------- saving

// The trainer names an unnamed save by where the run is when it saves, which the page cannot know beforehand.
const AUTOMATIC_NAME = "leave empty: named by its position when saved " +
  "(checkpoint_epoch_E_batch_B: E epochs completed, B batches into the next)";

/** Bytes a save of these contents is estimated to take, uncompressed, or null: the status carries one estimate per
 * contents (checkpoint_estimates), and the full one alone from a server that sends no others. */
function saveEstimate(status, contents) {
  const bytes = (status.checkpoint_estimates || {})[contents] ??
    (contents === "full" ? status.checkpoint_estimate_bytes : undefined);
  return typeof bytes === "number" ? bytes : null;
}

const fitsOnDisk = (bytes, free) => !(typeof bytes === "number" && typeof free === "number" && free < DISK_MARGIN * bytes);

/** zstd's ratio is not known before it runs: a compressed save takes at most the uncompressed estimate. */
function estimateText(status, contents, compression) {
  const bytes = saveEstimate(status, contents);
  const size = bytes === null ? "unknown" : `${compression === "zstd" ? "at most" : "about"} ${formatBytes(bytes)}`;
  return `Estimated size: ${size} · free disk space: ${formatBytes(status.disk_free_bytes)}`;
}

/** The save dialog: resolves to {name, contents, compression}, or null when cancelled (Cancel, Escape). */
function askSaveOptions(status) {
  const dialog = $("save-dialog");
  const name = $("save-name");
  const contents = $("save-contents");
  const compression = $("save-compression");
  name.value = "";
  contents.value = "full";
  compression.value = "none";
  $("save-name-hint").textContent = AUTOMATIC_NAME;
  const update = () => {
    const fits = fitsOnDisk(saveEstimate(status, contents.value), status.disk_free_bytes);
    $("save-estimate").textContent = estimateText(status, contents.value, compression.value) +
      (fits ? "" : " (not enough for this one)");
    $("save-estimate").classList.toggle("too-large", !fits);
    $("save-confirm").disabled = !fits;
  };
  contents.onchange = update;
  compression.onchange = update;
  update();
  dialog.returnValue = "";
  dialog.showModal();
  name.focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue !== "save" ? null
      : { name: name.value.trim(), contents: contents.value, compression: compression.value }), { once: true });
  });
}

async function saveCheckpoint() {
  const status = state.status;
  const smallest = saveEstimate(status, "weights-bf16") ?? saveEstimate(status, "full");
  const free = status.disk_free_bytes;
  if (!fitsOnDisk(smallest, free)) {
    toast(`Not enough disk space: the smallest checkpoint needs about ${formatBytes(smallest)} ` +
      `(with margin ${formatBytes(DISK_MARGIN * smallest)}), only ${formatBytes(free)} free`, "error");
    return;
  }
  const choice = await askSaveOptions(status);
  if (choice === null) return; // cancelled
  const { name, contents, compression } = choice;
  const body = { ...(name ? { name } : {}), ...(contents !== "full" ? { contents } : {}),
    ...(compression !== "none" ? { compression } : {}) }; // the defaults are the server's: not sent
  const result = await send("POST", "/save_checkpoint", body);
  // the checkpoint_saved event names an unnamed save, as the trainer named it
  if (result.ok) toast(name ? `Saving “${name}”…` : "Saving; it is named when saved…", "info");
}

// ---------------------------------------------------------------------------------------------- status

function pct(value) {
  return typeof value === "number" ? `${(value * 100).toFixed(1)}%` : "–";
}

function statusRows(s) {
  const train = s.train || {};
  const val = s.val || {};
  const rows = [
    ["run", s.run_id || "–", "run_id"],
    ["paused", s.paused ? "yes" : "no", "paused"],
    ["global step", formatNumber(s.global_step), "global_step"],
    ["samples / s", typeof s.samples_per_sec === "number" ? s.samples_per_sec.toFixed(1) : "–", "samples_per_sec"],
    ["train loss", formatNumber(train.loss), "train_loss"],
    ["train acc", pct(train.acc), "train_acc"],
    ["temperature", formatNumber(train.temperature, 3), "temperature"],
    ["val loss", formatNumber(val.loss), "val_loss"],
    ["val acc", pct(val.acc) + (typeof val.chance === "number" ? ` (chance ${pct(val.chance)})` : ""), "val_acc"],
  ];
  if (s.mode) rows.splice(1, 0, ["pretrain mode", s.mode, "mode"]);
  if (s.processes > 1) rows.splice(1, 0, ["processes", String(s.processes), "processes"]);
  if (typeof val.size_acc === "number") rows.push(["val size acc", pct(val.size_acc), "val_size_acc"]);
  if (typeof val.exact_acc === "number") rows.push(["val exact", pct(val.exact_acc), "val_exact_acc"]);
  if (typeof val.distinct_share === "number") {
    rows.push(["distinct messages", pct(val.distinct_share), "distinct_share"]);
    rows.push(["message entropy", `${formatNumber(val.message_entropy, 3)} bits`, "message_entropy"]);
  }
  if ("topsim" in val) rows.push(["topographic similarity", formatNumber(val.topsim, 3), "topsim"]);
  return rows.concat(mirrorRows(s.mirror));
}

/** The mirror's rows, when the server mirrors to object storage: where to (its URL, redacted by the server), what
 * it is doing and how many jobs wait, and its last error. */
function mirrorRows(m) {
  if (!m) return [];
  const rows = [["mirror", `${m.url} · ${m.state}${m.pending ? ` · ${m.pending} pending` : ""}`, "mirror"]];
  const e = m.last_error;
  if (e) {
    rows.push(["mirror error", `${e.action} of ${e.id} (attempt ${e.attempt}/${e.attempts}, ` +
      `${formatDate(e.at, true)}): ${e.error}`, "mirror_error"]);
  }
  return rows;
}

function renderStatusList(s) {
  const items = statusRows(s).flatMap(([label, value, key]) =>
    [el("dt", {}, label), el("dd", { "data-key": key }, value)]);
  if (s.val && s.val.message_collapse) {
    items.push(el("dt", {}, "messages"), el("dd", { "data-key": "message_collapse" },
      el("span", { className: "flag-collapse", title: "fewer than half of the messages are distinct" }, "collapse")));
  }
  $("status-list").replaceChildren(...items);
}

function renderProgress(s) {
  const epochs = s.epochs || 0;
  const running = ACTIVE_PHASES.includes(s.phase) && s.epoch < epochs;
  $("status-epoch").textContent = epochs
    ? `epoch ${running ? s.epoch + 1 : s.epoch} / ${epochs}${running ? ` (${s.epoch} done)` : ""}` : "epoch –";
  const perEpoch = s.batches_per_epoch || 0;
  $("status-batch").textContent = perEpoch ? `batch ${s.batch} / ${perEpoch}` : "batch –";
  $("batch-progress").style.width = perEpoch ? `${Math.min(100, (100 * s.batch) / perEpoch)}%` : "0%";
}

function renderButtons(s) {
  const active = ACTIVE_PHASES.includes(s.phase);
  const running = RUNNING_PHASES.includes(s.phase);
  $("start-pretraining").disabled = active;
  $("start-training").disabled = active;
  $("stop").disabled = !running;
  $("pause-resume").disabled = !running;
  $("pause-resume").textContent = s.paused ? "Resume" : "Pause";
  const save = $("save-checkpoint");
  save.disabled = s.phase !== "training";
  save.title = save.disabled ? `saving is possible during main training only (now ${s.phase})`
    : `estimated size ${formatBytes(s.checkpoint_estimate_bytes)}, ${formatBytes(s.disk_free_bytes)} free`;
  for (const button of document.querySelectorAll("[data-needs-idle]")) button.disabled = active;
}

function applyStatus(s) {
  state.status = s;
  const badge = $("phase-badge");
  badge.textContent = s.phase + (s.paused ? " · paused" : "");
  badge.className = `badge phase-${s.phase}${s.paused ? " paused" : ""}`;
  renderProgress(s);
  renderStatusList(s);
  renderButtons(s);
  const error = $("status-error");
  error.hidden = !(s.phase === "error" && s.error);
  error.textContent = s.error || "";
  if ((s.run_id || null) !== state.shownRun) renderCheckpoints(); // another run is current: regroup
  if (s.checkpoint_dir) {
    $("checkpoint-dir").textContent = s.checkpoint_dir;
    const input = $("cfg-checkpoint_dir");
    if (input) input.value = s.checkpoint_dir;
  }
}

// ---------------------------------------------------------------------------------------------- samples

function showSample(sample) {
  state.samples[sample.split === "val" ? "val" : "train"] = sample;
  const panels = ["train", "val"].map((split) => state.samples[split]).filter(Boolean).map(renderSample);
  $("samples").replaceChildren(...panels);
}

/** The latest samples and language analysis of the current or last run, as a reload finds them; the event stream
 * then replaces them. */
async function restoreSamples() {
  const latest = await load("/samples");
  for (const sample of [latest?.train, latest?.val]) if (sample) showSample(sample);
  if (latest?.language) showLanguage(latest.language);
}

// ---------------------------------------------------------------------------------------------- language

/** The language panel: only runs with a message send language events, and it stays hidden for the others. */
function showLanguage(d) {
  $("language").replaceChildren(...renderLanguage(d));
  $("language-panel").hidden = false;
}

// ---------------------------------------------------------------------------------------------- checkpoints

let refreshTimer = null;

/** Reload the table soon; bursts of checkpoint events cause one request. */
function refreshCheckpointsSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshCheckpoints, 200);
}

/** The checkpoints and the runs they belong to, fetched together so the groups and their rows agree. */
async function refreshCheckpoints() {
  const [listing, runs] = await Promise.all([load("/list_checkpoints"), load("/runs")]);
  if (runs) state.runs = runs.runs;
  if (listing) state.checkpoints = listing.checkpoints;
  if (runs) fillOverlaySelect(runs.runs); // labelled with each run's best checkpoint
  if (!listing) return;
  showListingError(listing.mirror_error);
  const ids = new Set(listing.checkpoints.filter(usable).map((c) => c.id));
  for (const side of ["a", "b"]) if (!ids.has(state.compare[side])) state.compare[side] = null;
  renderCheckpoints();
  fillPretrainedSelect(listing.checkpoints);
}

/** The mirror could not be listed: said above the table, which then holds only the checkpoints here. */
function showListingError(error) {
  const box = $("mirror-listing-error");
  box.hidden = !error;
  box.textContent = error ? `The mirror could not be listed, so only the checkpoints here are shown: ${error}` : "";
}

/** A checkpoint the page may act on: it has an id, and the server did not refuse it (a link, a bad name). */
const usable = (c) => Boolean(c.id) && !c.refused;

const byId = (id) => state.checkpoints.find((c) => c.id === id);

/** How a checkpoint is named in messages: its name and run. */
const describe = (c) => `“${c.name}” (run ${c.run_id})`;

function pickRadio(side, c) {
  if (!usable(c) || c.location === "mirror") return ""; // compared once restored here
  return el("input", { type: "radio", name: `compare-${side}`, value: c.id, checked: state.compare[side] === c.id,
    "aria-label": `compare ${side.toUpperCase()}: ${c.id}`, "data-side": side });
}

function actionButton(action, c, label, extra = {}) {
  return el("button", { type: "button", className: "btn btn-small", "data-action": action, "data-id": c.id,
    "data-name": c.name, ...extra }, label);
}

function checkpointActions(c) {
  if (!usable(c)) return el("td", { className: "actions muted" }, "no actions: fix or remove the file by hand");
  if (c.location === "mirror") { // only on the mirror: fetch it back first
    return el("td", { className: "actions" }, el("div", { className: "action-buttons" },
      actionButton("restore", c, "Restore", { title: "fetch it from the mirror into its run's folder" })));
  }
  const busy = ACTIVE_PHASES.includes(state.status.phase);
  const trainable = c.kind !== "pretrained" && !c.damaged;
  const resumable = trainable && (c.contents || "full") === "full"; // weights only: fine-tuned from, not resumed
  return el("td", { className: "actions" }, el("div", { className: "action-buttons" },
    resumable ? actionButton("resume", c, "Resume", { "data-needs-idle": true, disabled: busy }) : null,
    trainable ? actionButton("fine-tune", c, "Fine-tune from", { "data-needs-idle": true, disabled: busy }) : null,
    actionButton("verify", c, "Verify"),
    c.resume_command ? actionButton("copy-command", c, "Copy command", { title: `copy: ${c.resume_command}`,
      "aria-label": "copy the command that resumes it", "data-command": c.resume_command }) : null,
    el("a", { className: "btn btn-small", href: `${checkpointUrl(c.id)}/download`, "data-action": "download",
      "data-id": c.id, "data-name": c.name, download: c.file || `${c.name}.pth` }, "Download"),
    actionButton("delete", c, "Delete", { className: "btn btn-small btn-danger" })));
}

/** A name that may wrap after its underscores only (never inside a word): its parts with a <wbr> after each "_". */
const breakable = (name) => String(name).split(/(?<=_)/).flatMap((part, i) => (i ? [el("wbr"), part] : [part]));

/** A table cell; data-label names the column when narrow screens show rows as cards. */
const cell = (label, content, props = {}) => el("td", { "data-label": label, ...props }, content);

/** Where a checkpoint is kept, when the server mirrors to object storage: local (not uploaded yet), mirrored, or
 * upload failed (the reason in its title). Nothing without a mirror. */
function mirrorBadge(c) {
  const mirror = state.status && state.status.mirror;
  if (!mirror || !usable(c)) return null;
  if (c.location === "mirror") {
    return el("span", { className: "mirror remote", title: `kept only in ${mirror.url}` }, " on the mirror only");
  }
  const m = c.mirror || {};
  if (m.state === "mirrored" && m.url === mirror.url && m.sha256 === c.sha256) {
    return el("span", { className: "mirror mirrored", title: `mirrored to ${m.url} ${formatDate(m.at, true)}` },
      " mirrored");
  }
  if (m.state === "failed") {
    return el("span", { className: "mirror failed", title: m.error || "" }, " upload failed");
  }
  return el("span", { className: "mirror local", title: `not yet in ${mirror.url}` }, " local");
}

/** What a checkpoint holds and how it is stored, where that is not the default (full, uncompressed). */
function storedAs(c) {
  const parts = [c.contents && c.contents !== "full" ? c.contents : null,
    c.compression && c.compression !== "none" ? c.compression : null].filter(Boolean);
  return parts.length ? el("span", { className: "stored-as", title: "contents · compression" },
    ` ${parts.join(" · ")}`) : null;
}

function checkpointRow(c) {
  const verified = c.verified_at
    ? el("span", { className: "verified", title: `verified ${formatDate(c.verified_at, true)}` }, "✓") : "";
  const refused = !usable(c);
  const name = el("td", { className: "name" }, ...breakable(c.name),
    storedAs(c),
    c.damaged && !refused ? el("span", { className: "damaged", title: c.error || "" }, " damaged") : null,
    refused ? el("span", { className: "damaged" }, " refused") : null, mirrorBadge(c),
    refused ? el("div", { className: "row-error" }, c.error || "refused by the server") : null,
    c.mirror && c.mirror.state === "failed" ? el("div", { className: "row-error" }, c.mirror.error) : null);
  return el("tr", { "data-id": c.id, "data-name": c.name, "data-run-id": c.run_id,
    className: c.damaged || refused ? "is-damaged" : "" },
    cell("A", pickRadio("a", c), { className: "pick" }), cell("B", pickRadio("b", c), { className: "pick" }),
    name, cell("kind", c.kind || "–"), cell("epoch", formatNumber(c.epoch)), cell("batch", formatNumber(c.batch)),
    cell("step", formatNumber(c.global_step)), cell("val_loss", formatNumber(c.val_loss)),
    cell("val_acc", formatNumber(c.val_acc)), cell("size", typeof c.size === "number" ? formatBytes(c.size) : "–"),
    cell("created", formatDate(c.created_at), { className: "created", title: c.created_at }),
    cell("verified", verified), checkpointActions(c));
}

// ---------------------------------------------------------------------------------------------- run groups

const COLUMNS = 13;
const LEGACY_RUN = "legacy";

/** What a run trained: task/bottleneck, or the pretraining mode. */
function runWhat(run) {
  const c = run.config || {};
  if (run.phase === "pretraining") return `pretrain ${run.mode || c.pretrain_mode || ""}`.trim();
  return c.task_type ? `${c.task_type}/${c.bottleneck_type}` : "";
}

/** Where a run came from: "resumed from RUN:NAME at step S", "fine-tuned from …", or "fresh run". */
function lineage(run) {
  if (run.legacy) return run.description || "flat folder of version 0.6.0 and before";
  if (run.refused) return run.error || "refused";
  const parent = run.parent;
  if (!parent) return "fresh run";
  const verb = { resume: "resumed from", "fine-tune": "fine-tuned from" }[parent.relation] || `${parent.relation} of`;
  const step = typeof parent.global_step === "number" ? ` at step ${formatNumber(parent.global_step)}` : "";
  return `${verb} ${parent.id || parent.path || parent.name}${step}`;
}

/** The groups to show, in order: the current run first, then the others newest first (as /runs lists them), the
 * legacy flat folder last. A run without checkpoints is shown only when it is the current one or refused. */
function runGroups(runs, checkpoints, currentRun) {
  const byRun = new Map();
  for (const c of checkpoints) {
    if (!byRun.has(c.run_id)) byRun.set(c.run_id, []);
    byRun.get(c.run_id).push(c);
  }
  const known = new Map(runs.map((r) => [r.run_id, r]));
  for (const runId of byRun.keys()) { // listed since /runs was read: a bare group until the next refresh
    if (!known.has(runId)) known.set(runId, { run_id: runId, legacy: runId === LEGACY_RUN });
  }
  if (currentRun && !known.has(currentRun)) known.set(currentRun, { run_id: currentRun });
  const rank = (r) => (r.run_id === currentRun ? 0 : r.legacy ? 2 : 1);
  return [...known.values()]
    .filter((r) => r.run_id === currentRun || r.refused || byRun.has(r.run_id))
    .map((r, order) => ({ run: r, order, checkpoints: byRun.get(r.run_id) || [] }))
    .sort((x, y) => rank(x.run) - rank(y.run) || x.order - y.order);
}

function runHeader(run, count, current) {
  const parts = [
    el("span", { className: "run-id" }, run.run_id),
    current ? el("span", { className: "run-current" }, "current") : null,
    run.phase ? el("span", { className: "run-phase" }, run.phase) : null,
    runWhat(run) ? el("span", { className: "run-what" }, runWhat(run)) : null,
    run.started_at ? el("span", { className: "run-started", title: run.started_at }, formatDate(run.started_at)) : null,
    el("span", { className: "run-lineage", title: run.parent?.path || "" }, lineage(run)),
    el("span", { className: "run-count muted" }, `${count} checkpoint${count === 1 ? "" : "s"}`),
  ];
  const problems = run.problems?.length
    ? el("div", { className: "run-problems" }, run.problems.join("; ")) : null;
  return el("tr", { className: `run-header${run.refused ? " is-damaged" : ""}` },
    el("th", { colspan: COLUMNS, scope: "rowgroup" }, el("div", { className: "run-summary" }, ...parts), problems));
}

function runGroup({ run, checkpoints }, currentRun) {
  const current = run.run_id === currentRun;
  const rows = checkpoints.map(checkpointRow);
  if (!rows.length && !run.refused) {
    rows.push(el("tr", {}, el("td", { colspan: COLUMNS, className: "muted" }, "No checkpoints in this run yet.")));
  }
  return el("tbody", { className: `run-group${current ? " is-current" : ""}`, "data-run-id": run.run_id },
    runHeader(run, checkpoints.length, current), ...rows);
}

function renderCheckpoints() {
  const table = $("checkpoints-table");
  const currentRun = state.status.run_id || null;
  state.shownRun = currentRun;
  const groups = runGroups(state.runs, state.checkpoints, currentRun).map((g) => runGroup(g, currentRun));
  if (!groups.length) {
    groups.push(el("tbody", {}, el("tr", {}, el("td", { colspan: COLUMNS, className: "muted" }, "No checkpoints yet."))));
  }
  for (const body of [...table.tBodies]) body.remove();
  table.append(...groups);
  updateCompareButton();
}

function updateCompareButton() {
  const { a, b } = state.compare;
  $("compare").disabled = !(a && b && a !== b);
}

const checkpointUrl = (id) => `/checkpoints/${encodeURIComponent(id)}`;

async function verifyCheckpoint(c) {
  const result = await send("POST", `${checkpointUrl(c.id)}/verify`);
  if (!result.ok) return;
  if (result.data.ok) toast(`${describe(c)} verified: ${result.data.reason || "ok"}`, "success");
  else toast(`${describe(c)} failed verification: ${result.data.reason}`, "error");
  refreshCheckpointsSoon();
}

async function deleteCheckpoint(c) {
  if (!window.confirm(`Delete checkpoint ${describe(c)}? This cannot be undone.`)) return;
  const result = await send("DELETE", checkpointUrl(c.id));
  if (result.ok) refreshCheckpointsSoon();
}

function onTableClick(event) {
  const target = event.target.closest("[data-action]");
  if (!target) return;
  const c = byId(target.dataset.id);
  if (!c || !usable(c)) return; // gone since the table was drawn: the next refresh removes the row
  const action = target.dataset.action;
  if (action === "download") {
    if (!authIsRequired()) return; // the plain link downloads
    event.preventDefault(); // a link cannot send the token: fetch the file and save the blob
    download(target.getAttribute("href"), target.getAttribute("download"));
  } else if (action === "resume") startTraining({ resume_from: c.id }, `Resuming from ${describe(c)}`);
  else if (action === "fine-tune") startTraining({ fine_tune_from: c.id }, `Fine-tuning from ${describe(c)}`);
  else if (action === "verify") verifyCheckpoint(c);
  else if (action === "copy-command") copyCommand(c.resume_command, `resume ${describe(c)}`);
  else if (action === "delete") deleteCheckpoint(c);
  else if (action === "restore") restoreCheckpoint(c);
}

async function restoreCheckpoint(c) {
  const result = await send("POST", `${checkpointUrl(c.id)}/restore`);
  if (result.ok) toast(`Restoring ${describe(c)} from the mirror…`, "info");
}

/** Copy a command line and show it in a toast, so it can be read (or copied by hand) either way. */
async function copyCommand(command, what) {
  const copied = await copyText(command);
  const element = toast(`${copied ? "Copied the command to" : "Copy this command to"} ${what}: ${command}`,
    copied ? "success" : "info", COMMAND_TOAST_MS);
  element.dataset.command = command;
  element.dataset.copied = String(copied);
}

function onTableChange(event) {
  const input = event.target;
  if (input.type !== "radio") return;
  state.compare[input.dataset.side] = input.value;
  updateCompareButton();
}

// ---------------------------------------------------------------------------------------------- compare

function simpleTable(className, headers, rows) {
  return el("table", { className: `table ${className}` },
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))));
}

function flatMetrics(metrics) {
  const flat = {};
  for (const [split, values] of Object.entries(metrics || {})) {
    if (values && typeof values === "object") {
      for (const [key, value] of Object.entries(values)) flat[`${split} ${key}`] = value;
    } else flat[split] = values;
  }
  return flat;
}

function show(value) {
  if (typeof value === "number") return formatNumber(value);
  if (value === null || value === undefined) return "–";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function compareTables(data) {
  const a = flatMetrics(data.metrics.a);
  const b = flatMetrics(data.metrics.b);
  const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
  const configRows = data.config_diff.map((d) => [d.field, show(d.a), show(d.b)]);
  const tensors = [...data.tensor_changes].sort((x, y) => y.l2_diff - x.l2_diff).map((t) => [t.name,
    t.shape.join("×"), formatNumber(t.l2_diff), formatNumber(t.l2_a), t.l2_a ? pct(t.l2_diff / t.l2_a) : "–"]);
  return [
    el("h3", {}, `A: ${data.a_id}  ↔  B: ${data.b_id}`),
    el("div", { className: "compare-grid" }, // side by side where the panel is wide, stacked where it is not
      el("div", {},
        simpleTable("compare-params", ["", "A", "B"], [["parameters", formatNumber(data.parameters.a),
          formatNumber(data.parameters.b)]]),
        el("h4", {}, "Metrics"),
        simpleTable("compare-metrics", ["metric", "A", "B"], keys.map((k) => [k, show(a[k]), show(b[k])]))),
      el("div", {},
        el("h4", {}, `Config fields that differ (${configRows.length})`),
        configRows.length ? simpleTable("compare-config", ["field", "A", "B"], configRows)
          : el("p", { className: "muted" }, "The configs are the same."))),
    el("h4", {}, "Per-tensor change (L2)"),
    el("div", { className: "table-wrap tall" },
      simpleTable("compare-tensors", ["tensor", "shape", "‖B − A‖", "‖A‖", "relative"], tensors)),
  ];
}

async function compareCheckpoints() {
  const { a, b } = state.compare;
  const data = await load(`/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
  if (!data) return;
  const box = $("compare-result");
  const close = el("button", { type: "button", className: "btn btn-small close" }, "Close");
  close.addEventListener("click", () => { box.hidden = true; });
  box.replaceChildren(close, ...compareTables(data));
  box.hidden = false;
  box.scrollIntoView({ block: "start" }); // its scroll-margin keeps the header clear of the sticky top bar
}

// ---------------------------------------------------------------------------------------------- runs and curves

/** A run's best score, read from its best_model row: "best val loss 0.1234 · acc 51.0%", or "best –". */
function bestOf(runId) {
  const best = state.checkpoints.find((c) => c.run_id === runId && c.name === "best_model" && usable(c));
  if (!best || typeof best.val_loss !== "number") return "best –";
  const acc = typeof best.val_acc === "number" ? ` · acc ${pct(best.val_acc)}` : "";
  return `best val loss ${formatNumber(best.val_loss)}${acc}`;
}

/** How the overlay menu names a run: start time, the end of its id, what it trained, its best score. */
function runLabel(run) {
  const started = run.started_at ? formatDate(run.started_at, true) : null;
  return [started, run.run_id.slice(-6), runWhat(run) || null, bestOf(run.run_id)].filter(Boolean).join(" · ");
}

/** The overlay choices: runs with a metric history (the legacy flat folder and refused runs have none). */
function fillOverlaySelect(runs) {
  const select = $("overlay-run");
  const current = select.value;
  const options = runs.filter((r) => !r.legacy && !r.refused).map((r) => el("option",
    { value: r.run_id, selected: r.run_id === current, title: r.run_id }, runLabel(r)));
  select.replaceChildren(el("option", { value: "" }, "none"), ...options);
}

const runMetrics = (runId) => load(`/runs/${encodeURIComponent(runId)}/metrics`);

async function loadHistory(runId) {
  const data = await runMetrics(runId);
  if (!data) return null;
  const curves = new RunCurves();
  curves.reset(runId);
  curves.add(data.train, data.val);
  return curves;
}

async function chooseOverlay() {
  const runId = $("overlay-run").value;
  if (!runId) {
    charts.setOverlay(null, "");
    return;
  }
  const curves = await loadHistory(runId);
  if (curves) charts.setOverlay(curves, runId.slice(-6));
}

function onMetrics(data) {
  if (data.run_id !== charts.live.runId) charts.resetLive(data.run_id);
  charts.live.add(data.train, data.val);
  charts.schedule();
}

// ---------------------------------------------------------------------------------------------- events

/** " in run RUN" for a toast, when the event names its run. */
const inRun = (d) => (d.run_id ? ` in run ${d.run_id}` : "");

function onCheckpointSaved(d) {
  if (d.request_id) { // asked for by someone; automatic saves (best, periodic, autosave) only refresh the table
    toast(`Saved “${d.name}”${inRun(d)} to ${d.path} (epoch ${d.epoch}, batch ${d.batch}` +
      `${d.verified ? ", verified" : ""})`, "success");
  }
  refreshCheckpointsSoon();
}

function onCheckpointDeleted(d) {
  if (d.reason) toast(`Deleted “${d.name}”${inRun(d)}: ${d.reason}`, "info");
  refreshCheckpointsSoon();
}

/** The checkpoint a run left where it stopped or failed ({id, name, path, kind, resume_command}), in the status
 * panel until the next run starts; null or absent hides it. */
function showFinalCheckpoint(final, why) {
  const box = $("final-checkpoint");
  box.hidden = !final;
  if (!final) {
    box.replaceChildren();
    return;
  }
  const command = final.resume_command;
  const copy = command ? el("button", { type: "button", className: "btn btn-small", "data-command": command },
    "Copy command") : null;
  copy?.addEventListener("click", () => copyCommand(command, `resume “${final.name}”`));
  box.dataset.id = final.id || "";
  box.dataset.kind = final.kind || "";
  box.replaceChildren(
    el("p", {}, `${why}; saved “${final.name}”${final.kind ? ` (${final.kind})` : ""} at `,
      el("code", { className: "final-path" }, final.path || "?")),
    command ? el("div", { className: "final-resume" }, el("code", { className: "final-command" }, command), copy)
      : null);
}

/** After a reload: the final checkpoint of the last run, if it left one (listed with the same keys). */
function restoreFinalCheckpoint(status) {
  if (ACTIVE_PHASES.includes(status.phase) || !status.run_id) return;
  const final = state.checkpoints.find((c) => c.run_id === status.run_id && FINAL_KINDS.includes(c.kind)
    && usable(c));
  if (final) showFinalCheckpoint(final, final.kind === "error" ? "Training failed" : "Stopped");
}

/** " · saved NAME to PATH" for a toast, when the run left a final checkpoint. */
const finalNote = (final) => (final ? ` · saved “${final.name}” to ${final.path}` : "");

function onTrainingStarted(d) {
  showFinalCheckpoint(null);
  if (d.run_id !== charts.live.runId) charts.resetLive(d.run_id);
  state.samples = { train: null, val: null };
  $("samples").replaceChildren(el("p", { className: "muted" }, "Waiting for the first samples…"));
  $("language-panel").hidden = true; // until this run's first validation, if it sends a message
  $("language").replaceChildren();
  refreshCheckpointsSoon(); // a new run: its group goes first
}

function onTrainingEnded(kind, d) {
  const best = typeof d.best_val_loss === "number" ? `, best val loss ${formatNumber(d.best_val_loss)}` : "";
  toast(`${d.phase || "run"} ${kind} at step ${d.global_step}${best}${finalNote(d.final_checkpoint)}`,
    kind === "finished" ? "success" : "info", d.final_checkpoint ? COMMAND_TOAST_MS : undefined);
  if (kind === "stopped") showFinalCheckpoint(d.final_checkpoint, `Stopped at step ${formatNumber(d.global_step)}`);
  refreshCheckpointsSoon();
}

function onTrainingError(d) {
  toast(`Training failed: ${d.error}${finalNote(d.final_checkpoint)}`, "error",
    d.final_checkpoint ? COMMAND_TOAST_MS : undefined);
  showFinalCheckpoint(d.final_checkpoint, "Training failed");
  if (d.final_checkpoint) refreshCheckpointsSoon();
}

const HANDLERS = {
  status: applyStatus,
  metrics: onMetrics,
  samples: showSample,
  language: showLanguage,
  checkpoint_saved: onCheckpointSaved,
  checkpoint_error: (d) => {
    toast(`Checkpoint “${d.name}”${inRun(d)} failed: ${d.error}`, "error");
    refreshCheckpointsSoon();
  },
  checkpoint_deleted: onCheckpointDeleted,
  checkpoint_mirrored: () => refreshCheckpointsSoon(),
  checkpoint_restored: (d) => {
    toast(`Checkpoint “${d.name}”${inRun(d)} restored from the mirror`, "success");
    refreshCheckpointsSoon();
  },
  mirror_error: (d) => {
    const then = d.retry_in === null ? "gave up until the next start" : `retrying in ${d.retry_in} s`;
    toast(`Mirror: ${d.action} of “${d.name}” failed (attempt ${d.attempt}/${d.attempts}): ${d.error}; ${then}`,
      "error");
    if (d.retry_in === null) refreshCheckpointsSoon();
  },
  compile: (d) => {
    if (d.compiled) toast(`Compiled the model and ran its first step in ${formatNumber(d.seconds)} s`, "info");
    else toast(`Compile: torch.compile failed (${d.reason}); training goes on eager`, "error");
  },
  training_started: onTrainingStarted,
  training_stopped: (d) => onTrainingEnded("stopped", d),
  training_finished: (d) => onTrainingEnded("finished", d),
  training_error: onTrainingError,
};

function connectEvents(lastEventId) {
  const query = typeof lastEventId === "number" ? `?last_event_id=${lastEventId}` : "";
  const source = new EventSource(`/events${query}`);
  const connection = $("connection");
  source.addEventListener("open", () => { connection.textContent = "live"; connection.className = "connection live"; });
  source.addEventListener("error", () => { connection.textContent = "reconnecting…"; connection.className = "connection down"; });
  for (const [name, handler] of Object.entries(HANDLERS)) {
    source.addEventListener(name, (event) => handler(JSON.parse(event.data)));
  }
  return source;
}

// ---------------------------------------------------------------------------------------------- start-up

function wireControls() {
  $("start-pretraining").addEventListener("click", startPretraining);
  $("start-training").addEventListener("click", () => startTraining());
  $("stop").addEventListener("click", () => control("/stop"));
  $("pause-resume").addEventListener("click", pauseOrResume);
  $("save-checkpoint").addEventListener("click", saveCheckpoint);
  $("refresh-checkpoints").addEventListener("click", refreshCheckpoints);
  $("compare").addEventListener("click", compareCheckpoints);
  $("overlay-run").addEventListener("change", chooseOverlay);
  $("preset").addEventListener("change", choosePreset);
  const table = $("checkpoints-table");
  table.addEventListener("click", onTableClick);
  table.addEventListener("change", onTableChange);
  const slider = $("smoothing");
  slider.addEventListener("input", () => {
    const weight = Number(slider.value);
    $("smoothing-value").textContent = weight.toFixed(3);
    charts.setSmoothing(weight);
  });
  charts.setSmoothing(Number(slider.value));
  charts.watchVisibility(document.querySelector(".charts"));
}

async function init() {
  wireControls();
  const reply = await getJSON("/status");
  if (!reply.ok) toast(`/status: ${reply.data.error}`, "error");
  const status = reply.ok ? reply.data : { phase: "idle" };
  setAuthRequired(status.auth_required);
  const config = await load("/config");
  if (config) {
    buildForm(config.fields, config.defaults);
    buildPresets(config.presets);
    setProcesses(config.processes);
  }
  applyStatus(status);
  await refreshCheckpoints(); // the runs, and the encoders the form's settings may name
  if (config) showLastSettings(status);
  restoreFinalCheckpoint(status);
  await restoreSamples();
  if (status.run_id) { // history first; the event stream then continues from the status's last event id
    const history = await runMetrics(status.run_id);
    charts.resetLive(status.run_id);
    if (history) charts.live.add(history.train, history.val);
  }
  charts.draw();
  connectEvents(status.last_event_id);
}

init();
