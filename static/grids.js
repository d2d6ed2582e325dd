// ARC grids on canvases, and the samples panel built from `samples` events.

import { el } from "./api.js";

export const PALETTE = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00",
  "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25"];
const GRID_LINE = "#333333";
const MAX_GRID_PX = 112;
const CELL_MESSAGE_PX = 72; // smaller than the grids beside it, so a pair more often fits on one line

const arcColour = (id) => PALETTE[id] || "#444";
/** A message symbol's colour: the hue follows the symbol id so equal symbols look alike. */
const symbolColour = (symbol) => `hsl(${(symbol * 137) % 360} 65% 38%)`;

/** A canvas showing one grid (rows of colour ids, or of symbols with symbolColour), scaled to fit maxPx. */
export function gridCanvas(grid, maxPx = MAX_GRID_PX, colour = arcColour) {
  const rows = grid.length;
  const cols = rows ? grid[0].length : 0;
  const cell = Math.max(2, Math.floor(maxPx / Math.max(rows, cols, 1)));
  const canvas = el("canvas", { className: "grid", width: cols * cell, height: rows * cell,
    title: `${rows}×${cols}`, "data-rows": rows, "data-cols": cols });
  const ctx = canvas.getContext("2d");
  for (let r = 0; r < rows; r += 1) {
    for (let c = 0; c < cols; c += 1) {
      ctx.fillStyle = colour(grid[r][c]);
      ctx.fillRect(c * cell, r * cell, cell, cell);
    }
  }
  if (cell >= 6) drawGridLines(ctx, rows, cols, cell);
  return canvas;
}

function drawGridLines(ctx, rows, cols, cell) {
  ctx.strokeStyle = GRID_LINE;
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (let r = 1; r < rows; r += 1) {
    ctx.moveTo(0, r * cell + 0.5);
    ctx.lineTo(cols * cell, r * cell + 0.5);
  }
  for (let c = 1; c < cols; c += 1) {
    ctx.moveTo(c * cell + 0.5, 0);
    ctx.lineTo(c * cell + 0.5, rows * cell);
  }
  ctx.stroke();
}

/** A grid with a caption under it. */
function figure(grid, caption, className = "", maxPx = MAX_GRID_PX, colour = arcColour) {
  return el("figure", { className: `grid-figure ${className}`.trim() }, gridCanvas(grid, maxPx, colour),
    el("figcaption", {}, caption));
}

/** Share of equal cells when the shapes match, else null. */
function cellMatch(a, b) {
  if (!a || !b || a.length !== b.length || (a[0] || []).length !== (b[0] || []).length) return null;
  let same = 0;
  let total = 0;
  a.forEach((row, r) => row.forEach((v, c) => { total += 1; same += v === b[r][c] ? 1 : 0; }));
  return total ? same / total : 1;
}

/** Message symbols as small tokens; the hue follows the symbol id so equal symbols look alike. */
export function messageTokens(message) {
  const tokens = message.map((symbol) => el("span", { className: "token", title: `symbol ${symbol}`,
    style: `background: ${symbolColour(symbol)}` }, String(symbol)));
  return el("div", { className: "message" }, el("span", { className: "muted" }, "message "), ...tokens);
}

function reconstruction(sample) {
  const rows = (sample.grids || []).map((grid, i) => {
    const output = (sample.reconstructions || [])[i];
    const match = cellMatch(grid, output);
    const label = match === null ? "size differs" : `${Math.round(match * 100)}% cells`;
    // Communication with a cell code: the symbols of its first channel, one per 2x2 block of the grid.
    const cells = (sample.cell_messages || [])[i];
    const sent = cells ? [figure(cells, "cell message", "cell-message", CELL_MESSAGE_PX, symbolColour),
      el("span", { className: "arrow" }, "→")] : [];
    return el("div", { className: "pair" }, figure(grid, "input"), el("span", { className: "arrow" }, "→"), ...sent,
      output ? figure(output, `reconstruction · ${label}`, match === 1 ? "right" : "") : el("span", {}, "–"));
  });
  return el("div", { className: "pairs" }, ...rows);
}

function selection(sample) {
  const target = sample.target_index;
  const chosen = sample.chosen_index;
  const candidates = (sample.candidates || []).map((grids, i) => {
    const classes = ["candidate"];
    const notes = [`#${i}`];
    if (i === target) { classes.push("target"); notes.push("target"); }
    if (i === chosen) { classes.push(chosen === target ? "chosen-right" : "chosen-wrong"); notes.push("chosen"); }
    const size = grids.length > 1 ? 64 : 88;
    return el("div", { className: classes.join(" ") }, el("div", { className: "candidate-grids" },
      ...grids.map((g) => gridCanvas(g, size))), el("div", { className: "candidate-note" }, notes.join(" · ")));
  });
  const verdict = chosen === target ? "right" : "wrong";
  return el("div", {}, el("p", { className: `verdict ${verdict}` }, `receiver chose #${chosen}: ${verdict}`),
    el("div", { className: "candidates" }, ...candidates));
}

function classification(sample) {
  const right = sample.label === sample.predicted;
  return el("div", {}, el("div", { className: "pairs" }, ...(sample.grids || []).map((g) => figure(g, "grid"))),
    el("p", { className: `verdict ${right ? "right" : "wrong"}` },
      `label ${sample.label} · predicted ${sample.predicted}`));
}

const RENDERERS = { reconstruction, selection, puzzle_classification: classification };

/** The panel for one sample event (replaces the previous one of the same split). */
export function renderSample(sample) {
  const render = RENDERERS[sample.task_type];
  const body = render ? render(sample) : el("p", { className: "muted" }, `unknown task ${sample.task_type}`);
  return el("div", { className: "sample", "data-split": sample.split, "data-task": sample.task_type },
    el("h3", {}, `${sample.split} · step ${sample.global_step} · ${sample.task_type.replace("_", " ")}`),
    Array.isArray(sample.message) ? messageTokens(sample.message) : null, body);
}
