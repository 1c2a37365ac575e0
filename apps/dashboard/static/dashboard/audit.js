"use strict";
// The audit page's interval chart: each measure's model value (and its reference's) with its confidence interval,
// drawn from #audit-chart-data (views_audits: one entry per measure, with numbers only). Crossed measures are marked.
(function () {
  const source = document.getElementById("audit-chart-data");
  const element = document.getElementById("chart-audit-intervals");
  if (!source || !element || typeof Plotly === "undefined") return;
  const points = JSON.parse(source.textContent);
  if (!points.length) return;

  function trace(side, name, color) {
    const kept = points.filter((p) => p[side]);
    const low = kept.map((p) => (p[side].ci ? p[side].value - p[side].ci[0] : 0));
    const high = kept.map((p) => (p[side].ci ? p[side].ci[1] - p[side].value : 0));
    return {
      type: "scatter", mode: "markers", name,
      x: kept.map((p) => p[side].value),
      y: kept.map((p) => (p.crossed ? `${p.measure} ⚠` : p.measure)),
      error_x: { type: "data", symmetric: false, array: high, arrayminus: low, color, thickness: 1.5 },
      marker: { color, size: 8 },
      hovertemplate: `${name} %{y}: %{x:.3f}<extra></extra>`,
    };
  }

  const traces = [trace("model", "model", "#2f5bd3")];
  if (points.some((p) => p.reference)) traces.push(trace("reference", "reference", "#8a8f9c"));
  const shown = TunehouseCharts.layout("Model and reference, with 95% intervals (⚠ crossed a threshold)", "", { showLegend: traces.length > 1 });
  shown.hovermode = "closest";
  shown.xaxis = Object.assign({}, shown.xaxis, { zeroline: true, hoverformat: ".3f" });
  shown.yaxis = Object.assign({}, shown.yaxis, { type: "category", automargin: true, autorange: "reversed" });
  shown.height = Math.max(300, 60 + 28 * points.length);
  Plotly.react(element, traces, shown, TunehouseCharts.CONFIG);
})();
