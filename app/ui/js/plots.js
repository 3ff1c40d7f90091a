// Hand-written SVG plots: line charts, bar charts and heatmaps, with axes, labels and legends.
// They scale with their container (viewBox + width 100%), so they read at 1280 px and at 390 px.

const NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"];

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v) {
  if (!Number.isFinite(v)) return "";
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.01 || a >= 1e4)) return v.toExponential(1);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
}

// Round-number ticks covering [lo, hi].
function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

/**
 * A line chart. series: [{name, points: [[x, y], ...]}]. Returns an <svg> element.
 * opts: {title, xLabel, yLabel, yMin, yMax}
 */
export function lineChart(series, opts = {}) {
  // A narrower drawing on phones, so that its text is not scaled down to nothing.
  const W = window.innerWidth < 600 ? 380 : 560, H = 300, L = 56, R = 12, T = 28, B = 72;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img", "aria-label": opts.title || "chart" });
  svg.append(el("text", { x: W / 2, y: 18, "text-anchor": "middle", class: "plot-title" }, opts.title || ""));
  const pts = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (!pts.length) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "plot-empty" }, "no data yet"));
    return svg;
  }
  let [x0, x1] = [opts.xMin ?? Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let y0 = opts.yMin ?? Math.min(...pts.map((p) => p[1]));
  let y1 = opts.yMax ?? Math.max(...pts.map((p) => p[1]));
  if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const axes = el("g", { class: "axis" });
  axes.append(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }));
  axes.append(el("line", { x1: L, y1: T, x2: L, y2: H - B }));
  for (const t of ticks(x0, x1, 6)) {
    axes.append(el("line", { x1: sx(t), y1: H - B, x2: sx(t), y2: H - B + 4 }));
    axes.append(el("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle" }, fmt(t)));
  }
  for (const t of ticks(y0, y1, 5)) {
    axes.append(el("line", { x1: L - 4, y1: sy(t), x2: W - R, y2: sy(t), class: "grid" }));
    axes.append(el("text", { x: L - 7, y: sy(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  axes.append(el("text", { x: (L + W - R) / 2, y: H - B + 32, "text-anchor": "middle", class: "axis-label" }, opts.xLabel || ""));
  axes.append(el("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "axis-label",
    transform: `rotate(-90 14 ${(T + H - B) / 2})` }, opts.yLabel || ""));
  svg.append(axes);
  series.forEach((s, i) => {
    const good = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (!good.length) return;
    const color = PALETTE[i % PALETTE.length];
    const d = good.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    svg.append(el("path", { d, fill: "none", stroke: color, "stroke-width": 2, class: "series", "data-series": s.name }));
    if (good.length < 40) for (const [x, y] of good) svg.append(el("circle", { cx: sx(x), cy: sy(y), r: 2.5, fill: color }));
  });
  // Legend below the axis title, wrapping into rows.
  let lx = L, ly = H - B + 50;
  const legend = el("g", { class: "legend" });
  series.forEach((s, i) => {
    const w = 22 + s.name.length * 7;
    if (lx + w > W - R) { lx = L; ly += 14; }
    legend.append(el("rect", { x: lx, y: ly - 9, width: 12, height: 10, fill: PALETTE[i % PALETTE.length] }));
    legend.append(el("text", { x: lx + 16, y: ly }, s.name));
    lx += w + 10;
  });
  svg.append(legend);
  return svg;
}

/** Vertical bars. bars: [{label, value}] (or several groups: groups=[{name, values}]) */
export function barChart(labels, groups, opts = {}) {
  const n = labels.length;
  const W = Math.max(360, Math.min(900, 60 + n * 28 * groups.length)), H = 280, L = 50, R = 10, T = 28, B = 70;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img", "aria-label": opts.title || "bars" });
  svg.append(el("text", { x: W / 2, y: 18, "text-anchor": "middle", class: "plot-title" }, opts.title || ""));
  const all = groups.flatMap((g) => g.values).filter(Number.isFinite);
  const y1 = opts.yMax ?? Math.max(1e-9, ...all), y0 = opts.yMin ?? 0;
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const slot = (W - L - R) / Math.max(1, n), bw = (slot * 0.8) / groups.length;
  const axes = el("g", { class: "axis" });
  axes.append(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }));
  axes.append(el("line", { x1: L, y1: T, x2: L, y2: H - B }));
  for (const t of ticks(y0, y1, 5)) {
    axes.append(el("line", { x1: L - 4, y1: sy(t), x2: W - R, y2: sy(t), class: "grid" }));
    axes.append(el("text", { x: L - 7, y: sy(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  labels.forEach((lab, i) => {
    const x = L + slot * (i + 0.5);
    axes.append(el("text", { x, y: H - B + 14, "text-anchor": "end", transform: `rotate(-35 ${x} ${H - B + 14})` },
      String(lab).slice(0, 14)));
  });
  axes.append(el("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "axis-label",
    transform: `rotate(-90 14 ${(T + H - B) / 2})` }, opts.yLabel || ""));
  svg.append(axes);
  groups.forEach((g, gi) => {
    g.values.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      const x = L + slot * i + slot * 0.1 + gi * bw;
      const r = el("rect", { x, y: sy(v), width: Math.max(1, bw - 1), height: Math.max(0, sy(y0) - sy(v)),
        fill: PALETTE[gi % PALETTE.length] });
      r.append(el("title", {}, `${labels[i]} ${g.name}: ${fmt(v)}`));
      svg.append(r);
    });
  });
  if (groups.length > 1 || opts.legend) {
    let lx = L;
    groups.forEach((g, gi) => {
      svg.append(el("rect", { x: lx, y: H - 18, width: 12, height: 10, fill: PALETTE[gi % PALETTE.length] }));
      svg.append(el("text", { x: lx + 16, y: H - 9, class: "legend" }, g.name));
      lx += 30 + g.name.length * 7;
    });
  }
  return svg;
}

/**
 * A heatmap. rows/cols: labels; values[r][c] in [vmin, vmax]; text[r][c] optional cell text.
 * opts: {title, xLabel, yLabel, vmin, vmax, legend}
 */
export function heatmap(rows, cols, values, opts = {}) {
  const cell = Math.max(16, Math.min(44, Math.floor(520 / Math.max(cols.length, rows.length))));
  const L = 70, T = 30, B = 78, R = 20;
  const W = L + cols.length * cell + R, H = T + rows.length * cell + B;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot heatmap", role: "img", "aria-label": opts.title || "heatmap" });
  svg.style.maxWidth = `${Math.max(W, 360)}px`;
  svg.append(el("text", { x: W / 2, y: 18, "text-anchor": "middle", class: "plot-title" }, opts.title || ""));
  const vmin = opts.vmin ?? 0, vmax = opts.vmax ?? 1;
  const color = (v) => {
    const t = Math.max(0, Math.min(1, (v - vmin) / (vmax - vmin || 1)));
    // white -> dark blue, perceptually monotone enough to read order
    const c = (a, b) => Math.round(a + (b - a) * t);
    return `rgb(${c(247, 8)},${c(251, 48)},${c(255, 107)})`;
  };
  rows.forEach((rl, r) => {
    svg.append(el("text", { x: L - 6, y: T + r * cell + cell / 2 + 4, "text-anchor": "end", class: "tick" }, String(rl).slice(0, 10)));
    cols.forEach((_, c) => {
      const v = values[r][c];
      const g = el("g");
      const rect = el("rect", { x: L + c * cell, y: T + r * cell, width: cell - 1, height: cell - 1, fill: color(v), class: "cell" });
      rect.append(el("title", {}, `${rl} / ${cols[c]}: ${opts.text ? opts.text[r][c] : fmt(v)}`));
      g.append(rect);
      if (opts.text && cell >= 24) {
        const dark = (v - vmin) / (vmax - vmin || 1) > 0.55;
        g.append(el("text", { x: L + c * cell + cell / 2, y: T + r * cell + cell / 2 + 4, "text-anchor": "middle",
          class: "cell-text", fill: dark ? "#fff" : "#111" }, String(opts.text[r][c])));
      }
      svg.append(g);
    });
  });
  cols.forEach((cl, c) => {
    const x = L + c * cell + cell / 2, y = T + rows.length * cell + 12;
    svg.append(el("text", { x, y, "text-anchor": "end", class: "tick", transform: `rotate(-45 ${x} ${y})` }, String(cl).slice(0, 10)));
  });
  svg.append(el("text", { x: L + (cols.length * cell) / 2, y: H - 22, "text-anchor": "middle", class: "axis-label" }, opts.xLabel || ""));
  svg.append(el("text", { x: 12, y: T + (rows.length * cell) / 2, "text-anchor": "middle", class: "axis-label",
    transform: `rotate(-90 12 ${T + (rows.length * cell) / 2})` }, opts.yLabel || ""));
  // Colour legend: a 5-step ramp with its end values.
  const lg = el("g", { class: "legend" });
  const lx = L, ly = H - 12;
  for (let i = 0; i < 5; i++) lg.append(el("rect", { x: lx + 40 + i * 16, y: ly - 9, width: 16, height: 10, fill: color(vmin + ((vmax - vmin) * i) / 4) }));
  lg.append(el("text", { x: lx, y: ly }, fmt(vmin)));
  lg.append(el("text", { x: lx + 40 + 5 * 16 + 4, y: ly }, `${fmt(vmax)}  ${opts.legend || ""}`));
  svg.append(lg);
  return svg;
}
