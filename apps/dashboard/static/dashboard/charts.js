"use strict";

// Chart helpers shared by the job page and "compare runs": plotly.js line charts of a job's metrics series
// (GET /v1/fine_tuning/jobs/<id>/metrics), one look for every chart, resizing with the page.
const TunehouseCharts = (function () {
  // The validation loss under the names the engine and other tools use, most specific first.
  const VALIDATION_LOSS_KEYS = ["valid_loss", "validation_loss", "eval_loss"];
  const TRAINING_KEYS = new Set([
    "step", "total_steps", "train_loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch",
    "eta_seconds", "memory_mb", "attempt", "trained_tokens_fraction",
  ]);
  // Responsive: plotly follows its container's width, so the same chart works at 1280 px and at 390 px.
  const CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

  function isEvaluationMetric(name) {
    return !TRAINING_KEYS.has(name);
  }

  function validationLossKey(names) {
    return VALIDATION_LOSS_KEYS.find((key) => names.includes(key)) || null;
  }

  function layout(title, yTitle, options) {
    return {
      title: { text: title, font: { size: 14 } },
      margin: { l: 56, r: 12, t: 36, b: 40 },
      // The x axis is always the step (said in the title and on hover): its own title would collide with the legend.
      xaxis: { zeroline: false, hoverformat: "d" },
      yaxis: { title: { text: yTitle || "" }, zeroline: false, exponentformat: "e", type: options && options.logY ? "log" : "linear" },
      legend: { orientation: "h", y: -0.12, yanchor: "top" },
      hovermode: "x unified",
      showlegend: Boolean(options && options.showLegend),
      paper_bgcolor: "#fff",
      plot_bgcolor: "#fff",
      font: { family: "system-ui, sans-serif", size: 12 },
    };
  }

  // One trace: `key` of every point that has it, against its step.
  function trace(points, key, name, extra) {
    const kept = points.filter((point) => point[key] !== undefined && point[key] !== null);
    return Object.assign(
      {
        x: kept.map((point) => point.step),
        y: kept.map((point) => point[key]),
        name,
        type: "scatter",
        mode: "lines",
        hovertemplate: "step %{x}: %{y:.4~g}<extra>%{fullData.name}</extra>",
      },
      extra || {},
    );
  }

  function draw(element, traces, title, yTitle, options) {
    const hasData = traces.some((t) => t.x.length > 0);
    element.dataset.empty = hasData ? "false" : "true";
    const shown = layout(title, yTitle, options);
    if (!hasData) {
      shown.annotations = [{ text: "no data yet", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
    }
    // Plotly.react redraws in place: cheap enough for every change that is not a plain append.
    return Plotly.react(element, traces, shown, CONFIG);
  }

  async function fetchSeries(jobId, maxPoints) {
    const query = maxPoints ? `?max_points=${encodeURIComponent(maxPoints)}` : "";
    return apiRequest("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/metrics${query}`);
  }

  function evaluationMetricNames(points) {
    const names = new Set();
    for (const point of points) for (const name of Object.keys(point)) if (isEvaluationMetric(name)) names.add(name);
    return Array.from(names).sort();
  }

  // A metrics event's data as a chart point: its numbers only, like the server's series.
  function pointFromEventData(data) {
    const point = {};
    for (const [name, value] of Object.entries(data || {})) {
      if (typeof value === "number" && Number.isFinite(value) && name !== "total_steps" && name !== "eta_seconds") {
        point[name] = value;
      }
    }
    point.attempt = point.attempt || 0;
    return point;
  }

  return { CONFIG, draw, evaluationMetricNames, fetchSeries, isEvaluationMetric, layout, pointFromEventData, trace, validationLossKey };
})();
