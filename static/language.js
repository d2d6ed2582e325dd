// The language panel, drawn from `language` events: figures of the protocol, the most frequent messages with
// grids that got them, and a heatmap of the symbols each message position uses.

import { el, formatNumber } from "./api.js";
import { gridCanvas, messageTokens } from "./grids.js";

const EXAMPLE_PX = 56; // three grids a message, beside its tokens

const bits = (value) => (typeof value === "number" ? `${value.toFixed(2)} bits` : "–");

/** What topographic similarity compares, as its tooltip says it. */
export function topsimHelp(d) {
  const messages = d.message_distance === "edit" ? "edit distance: the messages vary in length"
    : "Hamming: every message has the same number of symbols";
  return `Topographic similarity: Spearman's correlation between the pairwise distances of ${d.topsim_examples} ` +
    "validation examples (the same ones at every validation) in grid space and in message space. Grids: Hamming " +
    "over the padded 30×30 grids the sender saw (an example's grids together), a grid of another size counting " +
    `as all its cells differing. Messages: ${messages}. Near 1: similar grids get similar messages; near 0: no ` +
    "relation; – where every distance is the same (undefined).";
}

const ENTROPY_HELP = "Plug-in estimates from the counts of the validation split's messages: H(M) is the entropy " +
  "of the message, H(M | colours) its entropy given how many distinct colours the sender saw, H(M | size) given " +
  "the side of the encoder's crop (5, 9, 13, 17, 21, 25 or 30; a pair's larger one). MI = H(M) − H(M | ·), the " +
  "bits the message carries about that property. With few examples per message, plug-in estimates understate " +
  "entropies and overstate MI; H(M) is at most log2 of the number of messages.";

function figures(d) {
  const rows = [
    ["topographic similarity", typeof d.topsim === "number" ? d.topsim.toFixed(3) : "–", "topsim", topsimHelp(d)],
    ["H(M)", bits(d.h_message), "h_message", ENTROPY_HELP],
    ["H(M | colours) · MI", `${bits(d.h_message_given_colours)} · ${bits(d.mi_colours)}`, "mi_colours",
      ENTROPY_HELP],
    ["H(M | size) · MI", `${bits(d.h_message_given_size)} · ${bits(d.mi_size)}`, "mi_size", ENTROPY_HELP],
    ["position entropy, mean · min", `${bits(d.position_entropy_mean)} · ${bits(d.position_entropy_min)}`,
      "position_entropy", "entropy of the symbol at each position; 0 is a position every message fills alike"],
  ];
  return el("dl", { className: "language-figures" }, ...rows.map(([label, value, key, help]) =>
    el("div", { title: help }, el("dt", {}, label), el("dd", { "data-key": key, title: help }, value))));
}

/** Positions × symbols: each cell shaded by the share of messages using that symbol there. */
function heatmap(d) {
  const symbols = [...Array(d.vocab_size).keys()];
  const head = el("tr", {}, el("th", {}, "pos"), ...symbols.map((s) => el("th", {}, String(s))),
    el("th", { title: "entropy of the symbol at this position" }, "H"));
  const rows = d.usage.map((shares, position) => el("tr", { "data-position": position },
    el("th", {}, String(position)),
    ...shares.map((share, symbol) => {
      const cell = el("td", { className: "usage", "data-share": share,
        title: `position ${position}, symbol ${symbol}: ${(share * 100).toFixed(1)}% of messages` },
      share >= 0.005 ? String(Math.round(share * 100)) : "");
      // a uniform position (1 / V each) at half strength, a position every message fills alike at full
      cell.style.backgroundColor = `rgba(74, 163, 255, ${Math.min(1, (share * d.vocab_size) / 2)})`;
      return cell;
    }),
    el("td", { className: "position-entropy" }, formatNumber(d.position_entropy[position], 2))));
  return el("div", { className: "heatmap-wrap" },
    el("table", { className: "heatmap", title: "share of messages (%) using each symbol at each position" },
      el("thead", {}, head), el("tbody", {}, ...rows)));
}

function topMessages(d) {
  const rows = d.top_messages.map((m, rank) => el("li", { className: "top-message", "data-count": m.count },
    el("div", { className: "top-message-head" }, messageTokens(m.message),
      el("span", { className: "muted" }, `#${rank + 1} · ${m.count} (${(m.share * 100).toFixed(1)}%)`)),
    el("div", { className: "top-message-examples" }, ...m.examples.map((grids) =>
      el("div", { className: "top-message-example" }, ...grids.map((g) => gridCanvas(g, EXAMPLE_PX)))))));
  return el("ol", { className: "top-messages" }, ...rows);
}

/** The panel's content for one language event. */
export function renderLanguage(d) {
  const cellNote = d.cell_symbols ? ` The analysis reads this message only, not the cell code's ` +
    `${formatNumber(d.cell_symbols)} symbols an example.` : "";
  return [
    el("p", { className: "muted language-caption" }, `${d.split} · step ${formatNumber(d.global_step)} · ` +
      `${formatNumber(d.num_messages)} messages of ${d.positions} symbols from ${d.vocab_size}.${cellNote} ` +
      "Entropies and MI are plug-in estimates."),
    figures(d),
    el("div", { className: "language-body" },
      el("div", { className: "language-messages" }, el("h3", {}, `Most frequent messages (${d.top_messages.length})`),
        topMessages(d)),
      el("div", {}, el("h3", {}, "Symbol usage by position"), heatmap(d))),
  ];
}
