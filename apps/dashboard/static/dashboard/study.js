"use strict";
// The study's four charts, drawn from the JSON the live part carries (#study-chart-data, the REST API's own study
// object trimmed): drawn once now, and again whenever htmx swaps in a newer live part.
(function () {
  const CONFIG = TunehouseCharts.CONFIG;
  let drawn = null;

  function layout(title, yTitle, showLegend) {
    const shown = TunehouseCharts.layout(title, yTitle, { showLegend });
    shown.hovermode = "closest";
    return shown;
  }

  function withNote(shown, text) {
    shown.annotations = [{ text, showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
    shown.xaxis = Object.assign({}, shown.xaxis, { visible: false });
    shown.yaxis = Object.assign({}, shown.yaxis, { visible: false });
    return shown;
  }

  function drawHistory(data) {
    const points = data.history;
    const traces = [
      {
        x: points.map((p) => p.number), y: points.map((p) => p.value), name: "trial", type: "scatter", mode: "markers",
        hovertemplate: "trial %{x}: %{y:.4~g}<extra></extra>",
      },
      {
        x: points.map((p) => p.number), y: points.map((p) => p.best), name: "best so far", type: "scatter", mode: "lines",
        line: { shape: "hv" }, hovertemplate: "best after trial %{x}: %{y:.4~g}<extra></extra>",
      },
    ];
    const shown = layout(`Optimisation history by trial (${data.direction} ${data.metric})`, data.metric, true);
    Plotly.react("chart-history", traces, points.length ? shown : withNote(shown, "no complete trial yet"), CONFIG);
  }

  function drawImportances(data) {
    const note = document.getElementById("importances-note");
    note.hidden = data.importances !== null && data.importances !== undefined;
    const entries = Object.entries(data.importances || {}).sort((a, b) => a[1] - b[1]);
    const traces = [{
      type: "bar", orientation: "h", x: entries.map((e) => e[1]), y: entries.map((e) => e[0]),
      hovertemplate: "%{y}: %{x:.1%}<extra></extra>",
    }];
    const shown = layout("Parameter importances (fANOVA)", "", false);
    shown.xaxis = Object.assign({}, shown.xaxis, { tickformat: ".0%", rangemode: "tozero" });
    shown.yaxis = Object.assign({}, shown.yaxis, { automargin: true, type: "category" });
    Plotly.react(
      "chart-importances", entries.length ? traces : [],
      entries.length ? shown : withNote(shown, "needs at least 2 complete trials"), CONFIG,
    );
  }

  // One dimension per searched hyperparameter, then the objective; categorical values become their choice's index
  // (labelled with the choice), log-scale ranges are shown as log10 so their spread is readable.
  function dimension(name, spec, trials) {
    const values = trials.map((t) => t.params[name]);
    if (spec.type === "categorical") {
      const keys = spec.choices.map((c) => JSON.stringify(c));
      return {
        label: name, values: values.map((v) => keys.indexOf(JSON.stringify(v))),
        tickvals: spec.choices.map((_, i) => i), ticktext: spec.choices.map((c) => String(c)),
        range: [0, Math.max(1, spec.choices.length - 1)],
      };
    }
    if (spec.log) {
      return { label: `log10(${name})`, values: values.map((v) => Math.log10(v)), range: [Math.log10(spec.low), Math.log10(spec.high)] };
    }
    return { label: name, values, range: spec.low === spec.high ? [spec.low - 1, spec.high + 1] : [spec.low, spec.high] };
  }

  function drawParallel(data) {
    const trials = data.trials.filter((t) => t.state === "complete" && t.value !== null);
    const shown = layout("Parameters of complete trials", "", false);
    if (!trials.length) {
      Plotly.react("chart-parallel", [], withNote(shown, "no complete trial yet"), CONFIG);
      return;
    }
    const dimensions = Object.entries(data.search_space).map(([name, spec]) => dimension(name, spec, trials));
    const objective = trials.map((t) => t.value);
    dimensions.push({ label: data.metric, values: objective });
    const traces = [{
      type: "parcoords", dimensions,
      // The better end of the objective is the brighter colour, whichever the direction.
      line: { color: objective, colorscale: "Viridis", reversescale: data.direction === "minimize", showscale: true },
    }];
    shown.margin = { l: 60, r: 60, t: 70, b: 30 };
    Plotly.react("chart-parallel", traces, shown, CONFIG);
  }

  function drawIntermediate(data) {
    const reported = data.trials.filter((t) => t.intermediate_values.length);
    const traces = reported.map((t) => ({
      x: t.intermediate_values.map((p) => p[0]), y: t.intermediate_values.map((p) => p[1]),
      name: `#${t.number} ${t.state}`, type: "scatter", mode: "lines+markers",
      line: { dash: t.state === "pruned" ? "dash" : "solid" },
      hovertemplate: `trial ${t.number} (${t.state}) step %{x}: %{y:.4~g}<extra></extra>`,
    }));
    const shown = layout(`${data.metric} at each evaluation, by step (pruned: dashed)`, data.metric, reported.length <= 12);
    Plotly.react("chart-intermediate", traces, reported.length ? shown : withNote(shown, "no evaluation reported yet"), CONFIG);
  }

  function drawAll() {
    const source = document.getElementById("study-chart-data");
    if (!source || typeof Plotly === "undefined" || source.textContent === drawn) return;
    drawn = source.textContent;
    const data = JSON.parse(drawn);
    drawHistory(data);
    drawImportances(data);
    drawParallel(data);
    drawIntermediate(data);
  }

  document.body.addEventListener("htmx:afterSettle", drawAll);
  drawAll();
})();
