// Live curves: every point kept in typed arrays, drawn min/max-downsampled with Plotly.react at most ~2/s.

const BUCKETS = 1000; // min/max buckets per trace: at most 2000 drawn points however long the run
const REDRAW_MS = 500;
const COLORS = { train: "#4ea1ff", val: "#ffb347", overlayTrain: "#c084fc", overlayVal: "#f472b6", temperature: "#2ECC40" };

/** A growable (x, y) series in Float64Arrays, with an incrementally kept debiased EMA of y. */
export class Series {
  constructor(capacity = 1024) {
    this.x = new Float64Array(capacity);
    this.y = new Float64Array(capacity);
    this.smooth = new Float64Array(capacity);
    this.length = 0;
    this.weight = 0;
    this.ema = 0;
    this.emaCount = 0;
  }

  clear() {
    this.length = 0;
    this.ema = 0;
    this.emaCount = 0;
  }

  lastX() {
    return this.length ? this.x[this.length - 1] : -Infinity;
  }

  push(x, y) {
    if (this.length === this.x.length) this.grow();
    const value = typeof y === "number" ? y : NaN;
    this.x[this.length] = x;
    this.y[this.length] = value;
    this.smooth[this.length] = this.smoothed(value);
    this.length += 1;
  }

  grow() {
    for (const key of ["x", "y", "smooth"]) {
      const bigger = new Float64Array(this[key].length * 2);
      bigger.set(this[key]);
      this[key] = bigger;
    }
  }

  /** TensorBoard's smoothing: EMA started at 0, divided by (1 - w^n) so early points are not pulled to 0. */
  smoothed(value) {
    if (!Number.isFinite(value)) return value;
    this.ema = this.ema * this.weight + (1 - this.weight) * value;
    this.emaCount += 1;
    return this.weight === 0 ? value : this.ema / (1 - this.weight ** this.emaCount);
  }

  setWeight(weight) {
    this.weight = weight;
    this.ema = 0;
    this.emaCount = 0;
    for (let i = 0; i < this.length; i += 1) this.smooth[i] = this.smoothed(this.y[i]);
  }
}

/** First index whose x >= value (x sorted ascending). */
function lowerBound(xs, length, value) {
  let lo = 0;
  let hi = length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Index range [start, end) covering [x0, x1] plus one point either side, so lines reach the edges. */
function visibleRange(series, range) {
  if (!range) return [0, series.length];
  const start = Math.max(0, lowerBound(series.x, series.length, range[0]) - 1);
  const end = Math.min(series.length, lowerBound(series.x, series.length, range[1]) + 1);
  return [start, end];
}

/** Keep each bucket's min and max point (in x order), skipping NaN; short ranges are returned whole. */
export function minMaxDownsample(xs, ys, start, end, buckets = BUCKETS) {
  const outX = [];
  const outY = [];
  const keep = (i) => {
    outX.push(xs[i]);
    outY.push(ys[i]);
  };
  const count = end - start;
  if (count <= 2 * buckets) {
    for (let i = start; i < end; i += 1) if (Number.isFinite(ys[i])) keep(i);
    return { x: outX, y: outY };
  }
  const size = count / buckets;
  for (let b = 0; b < buckets; b += 1) {
    const from = start + Math.floor(b * size);
    const to = start + Math.floor((b + 1) * size);
    let iMin = -1;
    let iMax = -1;
    for (let i = from; i < to; i += 1) {
      const y = ys[i];
      if (!Number.isFinite(y)) continue;
      if (iMin < 0 || y < ys[iMin]) iMin = i;
      if (iMax < 0 || y > ys[iMax]) iMax = i;
    }
    if (iMin < 0) continue;
    if (iMin === iMax) keep(iMin);
    else if (iMin < iMax) { keep(iMin); keep(iMax); } else { keep(iMax); keep(iMin); }
  }
  return { x: outX, y: outY };
}

/** The curves of one run: train loss/acc/temperature per batch, val loss/acc per validation. */
export class RunCurves {
  constructor() {
    this.runId = null;
    this.trainLoss = new Series();
    this.trainAcc = new Series();
    this.temperature = new Series();
    this.valLoss = new Series();
    this.valAcc = new Series();
  }

  all() {
    return [this.trainLoss, this.trainAcc, this.temperature, this.valLoss, this.valAcc];
  }

  reset(runId) {
    this.runId = runId;
    for (const series of this.all()) series.clear();
  }

  /** Append points from a metrics event or a run's history; points at or before the last step are skipped. */
  add(train, val) {
    for (const p of train || []) {
      if (typeof p.global_step !== "number" || p.global_step <= this.trainLoss.lastX()) continue;
      this.trainLoss.push(p.global_step, p.loss);
      this.trainAcc.push(p.global_step, p.acc);
      this.temperature.push(p.global_step, p.temperature);
    }
    for (const p of val || []) {
      if (typeof p.global_step !== "number" || p.global_step <= this.valLoss.lastX()) continue;
      this.valLoss.push(p.global_step, p.val_loss);
      this.valAcc.push(p.global_step, p.val_acc);
    }
  }

  setSmoothing(weight) {
    this.trainLoss.setWeight(weight);
    this.trainAcc.setWeight(weight);
  }

  pointCount() {
    return this.trainLoss.length + this.valLoss.length;
  }
}

function trace(series, range, name, style, smoothed = false) {
  const [start, end] = visibleRange(series, range);
  const { x, y } = minMaxDownsample(series.x, smoothed ? series.smooth : series.y, start, end);
  return { type: "scatter", x, y, name, mode: "lines", ...style };
}

/** A chart's layout; with a placeholder (no point to draw yet) it shows that text instead of empty axes, whose
 * made-up range would only collide with the title. */
function layout(title, yTitle, height, placeholder = null) {
  const axis = { gridcolor: "#2b3445", zerolinecolor: "#2b3445", color: "#9aa7bd", visible: !placeholder };
  return {
    title: { text: title, font: { size: 13 }, x: 0.01, xanchor: "left", y: 0.98, yanchor: "top" },
    height,
    margin: { l: 48, r: 12, t: 44, b: 30 },
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    font: { color: "#d6deeb", size: 11 },
    xaxis: { ...axis, title: { text: "global step", standoff: 4, font: { size: 10 } } },
    yaxis: { ...axis, title: { text: yTitle } },
    legend: { orientation: "h", x: 1, xanchor: "right", y: 1.0, yanchor: "bottom", font: { size: 10 } },
    uirevision: "keep", // zoom and hidden traces survive every redraw
    showlegend: !placeholder,
    annotations: placeholder ? [{ text: placeholder, showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5,
      font: { size: 13, color: "#8a97ad" } }] : [],
  };
}

const isEmpty = (traces) => traces.every((t) => t.x.length === 0);

/** Draws the loss, accuracy and temperature charts from the live run and an optional overlay run. */
export class Charts {
  constructor(elements) {
    this.elements = elements; // {loss, acc, temperature}
    this.live = new RunCurves();
    this.overlay = null;
    this.overlayLabel = "";
    this.smoothing = 0.6;
    this.ranges = { loss: null, acc: null, temperature: null };
    this.lastDraw = 0;
    this.timer = null;
    this.drawn = false;
    this.dirty = false;
    this.onScreen = true;
  }

  /** Redraw only what someone can see: not in a hidden tab, not while the charts are scrolled away. */
  watchVisibility(container) {
    document.addEventListener("visibilitychange", () => this.dirty && this.schedule());
    new IntersectionObserver((entries) => {
      this.onScreen = entries.some((entry) => entry.isIntersecting);
      if (this.dirty) this.schedule();
    }).observe(container);
  }

  setOverlay(curves, label) {
    this.overlay = curves;
    this.overlayLabel = label;
    if (curves) curves.setSmoothing(this.smoothing);
    this.schedule();
  }

  setSmoothing(weight) {
    this.smoothing = weight;
    this.live.setSmoothing(weight);
    if (this.overlay) this.overlay.setSmoothing(weight);
    this.schedule();
  }

  resetLive(runId) {
    this.live.reset(runId);
    this.live.setSmoothing(this.smoothing);
    this.schedule();
  }

  /** Redraw soon, but never more often than every REDRAW_MS. */
  schedule() {
    this.dirty = true;
    if (this.timer !== null || document.hidden || !this.onScreen) return;
    const wait = Math.max(0, REDRAW_MS - (performance.now() - this.lastDraw));
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.dirty && !document.hidden && this.onScreen) this.draw();
    }, wait);
  }

  draw() {
    this.lastDraw = performance.now();
    this.dirty = false;
    this.drawMetric("loss", "Loss", "loss", this.live.trainLoss, this.live.valLoss, (c) => [c.trainLoss, c.valLoss]);
    this.drawMetric("acc", "Accuracy", "accuracy", this.live.trainAcc, this.live.valAcc, (c) => [c.trainAcc, c.valAcc]);
    this.drawTemperature();
    if (!this.drawn) this.listenForZoom();
    this.drawn = true;
  }

  drawMetric(key, title, yTitle, train, val, pick) {
    const range = this.ranges[key];
    const traces = [
      trace(train, range, "train (raw)", { line: { color: COLORS.train, width: 1 }, opacity: 0.25 }),
      trace(train, range, "train", { line: { color: COLORS.train, width: 2 } }, true),
      trace(val, range, "val", { line: { color: COLORS.val, width: 2 }, mode: "lines+markers", marker: { size: 4 } }),
    ];
    if (this.overlay) {
      const [oTrain, oVal] = pick(this.overlay);
      const label = this.overlayLabel;
      traces.push(trace(oTrain, range, `${label} train`, { line: { color: COLORS.overlayTrain, width: 1.5, dash: "dot" } }, true));
      traces.push(trace(oVal, range, `${label} val`, { line: { color: COLORS.overlayVal, width: 1.5, dash: "dash" } }));
    }
    this.plot(key, traces, layout(title, yTitle, 260, this.placeholder(traces)));
  }

  /** The text an empty chart shows instead of axes, or null when it has points. */
  placeholder(traces) {
    if (!isEmpty(traces)) return null;
    return this.live.pointCount() ? "nothing to draw for this run" : "waiting for the first step";
  }

  plot(key, traces, chartLayout) {
    const element = this.elements[key];
    element.dataset.empty = String(chartLayout.annotations.length > 0);
    Plotly.react(element, traces, chartLayout, { responsive: true, displaylogo: false });
  }

  drawTemperature() {
    const range = this.ranges.temperature;
    const traces = [trace(this.live.temperature, range, "temperature", { line: { color: COLORS.temperature, width: 2 } })];
    if (this.overlay) {
      traces.push(trace(this.overlay.temperature, range, `${this.overlayLabel} temperature`,
        { line: { color: COLORS.overlayTrain, width: 1.5, dash: "dot" } }));
    }
    this.plot("temperature", traces, layout("Temperature", "τ", 180, this.placeholder(traces)));
  }

  /** Zooming re-downsamples the visible x-range, so detail appears as you zoom in. */
  listenForZoom() {
    for (const [key, element] of Object.entries(this.elements)) {
      element.on("plotly_relayout", (event) => {
        if (event["xaxis.autorange"]) this.ranges[key] = null;
        else if ("xaxis.range[0]" in event) this.ranges[key] = [event["xaxis.range[0]"], event["xaxis.range[1]"]];
        else if (Array.isArray(event["xaxis.range"])) this.ranges[key] = event["xaxis.range"];
        else return;
        this.schedule();
      });
    }
  }
}
