"use strict";

// Live job page. The server renders only the job row, its status changes and checkpoints; the metric curves come
// from the metrics API (already one point per step and thinned), the latest events from the events API, and then
// one websocket, opened `after` the newest event loaded, pushes every new event and job snapshot. On reconnect it
// asks again from the newest event seen, so nothing is missed and a job with 100k events never replays them all.
(function () {
  const job = JSON.parse(document.getElementById("job-data").textContent);
  const jobPath = `/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}`;
  const finished = new Set(["succeeded", "failed", "cancelled"]);
  const EVENTS_PAGE_SIZE = 100; // the events API's largest page
  const INITIAL_EVENT_PAGES = 2;
  const CHECKPOINTS_SHOWN = 20;
  const EVALUATION_POLL_MS = 1000;

  const el = (id) => document.getElementById(id);
  let currentStatus = job.status;

  // ---------------------------------------------------------------------------------------------- header, progress

  function formatDuration(seconds) {
    const total = Math.max(0, Math.round(seconds));
    const hours = Math.floor(total / 3600);
    const minutes = Math.floor((total % 3600) / 60);
    const secs = total % 60;
    if (hours) return `${hours} h ${minutes} min`;
    if (minutes) return `${minutes} min ${secs} s`;
    return `${secs} s`;
  }

  function formatTime(unixSeconds) {
    return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : "";
  }

  function formatNumber(value) {
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return String(value);
    return Math.abs(value) < 0.001 && value !== 0 ? value.toExponential(3) : value.toFixed(4);
  }

  function showError(message) {
    el("job-error").textContent = message;
    el("job-error").hidden = false;
  }

  function showJob(snapshot, { live = true } = {}) {
    currentStatus = snapshot.status;
    el("job-status").textContent = snapshot.status;
    el("job-status").className = `status-${snapshot.status}`;
    el("job-phase").textContent = `(${snapshot.phase})`;
    if (snapshot.fine_tuned_model) el("fine-tuned-model").textContent = snapshot.fine_tuned_model;
    if (snapshot.error) showError(snapshot.error.message);
    if (snapshot.progress) showProgress(snapshot.progress.step, snapshot.progress.total_steps, snapshot.progress.train_loss);
    const isFinished = finished.has(snapshot.status);
    el("cancel-job").hidden = isFinished;
    el("pause-job").disabled = !(snapshot.status === "running" || snapshot.status === "queued");
    el("resume-job").disabled = snapshot.status !== "paused";
    if (snapshot.status !== "running") el("job-eta").textContent = "";
    const succeeded = snapshot.status === "succeeded";
    const becameSucceeded = succeeded && el("evaluate-card").hidden;
    el("generate-card").hidden = !succeeded;
    el("deploy-card").hidden = !succeeded;
    el("evaluate-card").hidden = !succeeded;
    if (becameSucceeded && live) loadEvaluations();
    if (live) addTimelineEntry(snapshot.status);
  }

  function showProgress(step, totalSteps, loss) {
    if (totalSteps) {
      el("job-progress").max = totalSteps;
      el("job-total-steps").textContent = totalSteps;
    }
    if (step !== undefined && step !== null) {
      el("job-progress").value = step;
      el("job-step").textContent = step;
    }
    if (loss !== undefined && loss !== null) el("job-loss").textContent = Number(loss).toFixed(4);
  }

  function showRates(data) {
    if (data.tokens_per_second) el("job-throughput").textContent = `· ${Math.round(data.tokens_per_second).toLocaleString()} tokens/s`;
    if (typeof data.eta_seconds === "number" && currentStatus === "running" && data.step < data.total_steps) {
      el("job-eta").textContent = `· about ${formatDuration(data.eta_seconds)} left`;
    } else {
      el("job-eta").textContent = "";
    }
  }

  // The server rendered the changes so far; a snapshot with another status is a new one, timed now.
  function addTimelineEntry(status) {
    const timeline = el("status-timeline");
    const last = timeline.lastElementChild;
    if (last && last.dataset.status === status) return;
    if (last && last.dataset.status === "") last.remove();
    const item = document.createElement("li");
    item.dataset.status = status;
    const time = document.createElement("time");
    const now = new Date();
    time.dateTime = now.toISOString();
    time.textContent = now.toLocaleString();
    const label = document.createElement("span");
    label.className = `status-${status}`;
    label.textContent = status;
    item.append(time, " ", label);
    timeline.append(item);
  }

  // ------------------------------------------------------------------------------------------------------ charts

  // One point per step, in step order, like the metrics API: a newer attempt replaces what older ones logged from
  // the step it restarted at (the resumed run went on from its checkpoint, not from the abandoned steps).
  const series = [];
  let chartsReady = false;
  let pendingRedraw = false;
  let pendingAppends = [];
  let drawScheduled = false;

  function latestAttempt() {
    return series.reduce((highest, point) => Math.max(highest, point.attempt || 0), 0);
  }

  // Returns "append" when the point goes at the end of the curve, "redraw" when earlier points changed, or null.
  function mergePoint(point) {
    if (typeof point.step !== "number") return null;
    const newest = latestAttempt();
    if (point.attempt > newest) {
      while (series.length && series[series.length - 1].step >= point.step) series.pop();
      series.push(point);
      return "redraw";
    }
    const index = series.findIndex((kept) => kept.step >= point.step);
    if (index === -1) {
      series.push(point);
      return "append";
    }
    const kept = series[index];
    if (kept.step === point.step) {
      if (point.attempt < kept.attempt) return null; // an older attempt's step, already superseded
      // The same step again (the series and the events overlap): what either carries is kept.
      series[index] = point.attempt === kept.attempt ? { ...kept, ...point } : point;
      return "redraw";
    }
    if (point.attempt < newest) {
      // Before the newest attempt's first step this is shared history; after it, an abandoned run's.
      const firstOfNewest = series.find((p) => p.attempt === newest);
      if (firstOfNewest && point.step >= firstOfNewest.step) return null;
    }
    series.splice(index, 0, point);
    return "redraw";
  }

  function drawCharts() {
    const names = TunehouseCharts.evaluationMetricNames(series);
    const validationKey = TunehouseCharts.validationLossKey(names);
    const lossTraces = [TunehouseCharts.trace(series, "train_loss", "training loss")];
    if (validationKey) {
      lossTraces.push(TunehouseCharts.trace(series, validationKey, "validation loss", { mode: "lines+markers" }));
    }
    TunehouseCharts.draw(el("chart-loss"), lossTraces, "Loss by step", "loss", { showLegend: Boolean(validationKey) });
    TunehouseCharts.draw(el("chart-learning-rate"), [TunehouseCharts.trace(series, "learning_rate", "learning rate")], "Learning rate by step", "learning rate");
    TunehouseCharts.draw(el("chart-grad-norm"), [TunehouseCharts.trace(series, "grad_norm", "grad norm")], "Gradient norm by step", "grad norm");
    TunehouseCharts.draw(
      el("chart-evaluation"),
      names.map((name) => TunehouseCharts.trace(series, name, name, { mode: "lines+markers" })),
      names.length ? "Evaluation by step" : "Evaluation (none yet)",
      "",
      { showLegend: true },
    );
  }

  // Appends without evaluation numbers only extend the three training curves; anything else redraws.
  function extendCharts(points) {
    const keysByChart = [["chart-loss", "train_loss"], ["chart-learning-rate", "learning_rate"], ["chart-grad-norm", "grad_norm"]];
    for (const [chartId, key] of keysByChart) {
      const element = el(chartId);
      const withKey = points.filter((point) => typeof point[key] === "number");
      if (!withKey.length) continue;
      if (element.dataset.empty !== "false") return false;
      Plotly.extendTraces(element, { x: [withKey.map((p) => p.step)], y: [withKey.map((p) => p[key])] }, [0]);
    }
    return true;
  }

  function flushCharts() {
    drawScheduled = false;
    if (!chartsReady) return;
    const appends = pendingAppends;
    pendingAppends = [];
    const bringsNewMetric = appends.some((point) => Object.keys(point).some((name) => TunehouseCharts.isEvaluationMetric(name)));
    if (pendingRedraw || bringsNewMetric || !extendCharts(appends)) drawCharts();
    pendingRedraw = false;
  }

  // A replay after a reconnect can bring hundreds of points at once: they are drawn once per frame, not one by one.
  function addPoint(point) {
    const change = mergePoint(point);
    if (change === "append") pendingAppends.push(point);
    else if (change === "redraw") pendingRedraw = true;
    if (change && !drawScheduled) {
      drawScheduled = true;
      window.requestAnimationFrame(flushCharts);
    }
  }

  async function loadSeries() {
    try {
      const response = await TunehouseCharts.fetchSeries(job.id);
      series.splice(0, series.length, ...response.data);
      el("charts-note").textContent = response.downsampled
        ? `Showing ${response.data.length.toLocaleString()} of ${response.total_points.toLocaleString()} steps (evaluations and the last step always shown); new steps are added live.`
        : "";
    } catch (error) {
      el("charts-note").textContent = `Metrics could not be loaded: ${error.message}`;
    }
  }

  // -------------------------------------------------------------------------------------------------- events log

  const seenEventIds = new Set();
  let newestEventId = null;
  let oldestEventId = null;

  function eventItem(event) {
    const item = document.createElement("li");
    item.className = `event level-${event.level}`;
    item.dataset.eventId = event.id;
    const time = document.createElement("time");
    time.dateTime = new Date(event.created_at * 1000).toISOString();
    time.textContent = new Date(event.created_at * 1000).toLocaleTimeString();
    item.append(time, ` ${event.message}`);
    return item;
  }

  // A live event: newest on top, and what it says reaches the progress, the charts and the checkpoints.
  function showLiveEvent(event) {
    if (seenEventIds.has(event.id)) return;
    seenEventIds.add(event.id);
    newestEventId = event.id;
    if (oldestEventId === null) oldestEventId = event.id;
    applyEventData(event, { live: true });
    el("events").prepend(eventItem(event));
  }

  function applyEventData(event, { live }) {
    const data = event.data;
    if (!data) return;
    if (event.type === "metrics") {
      if (live) {
        showProgress(data.step, data.total_steps, data.train_loss);
        showRates(data);
      }
      addPoint(TunehouseCharts.pointFromEventData(data));
    } else if (data.checkpoint && live) {
      refreshCheckpointsSoon();
    }
  }

  async function fetchEventsPage(after) {
    const query = new URLSearchParams({ limit: String(EVENTS_PAGE_SIZE) });
    if (after) query.set("after", after);
    return apiRequest("GET", `${jobPath}/events?${query}`);
  }

  // Older pages go at the bottom (the list is newest first).
  function appendOlder(events) {
    const fragment = document.createDocumentFragment();
    for (const event of events) {
      if (seenEventIds.has(event.id)) continue;
      seenEventIds.add(event.id);
      fragment.append(eventItem(event));
      oldestEventId = event.id;
    }
    el("events").append(fragment);
  }

  // The newest events, shown; returned oldest first for what they say to the charts and the rates.
  async function loadLatestEvents() {
    let after = null;
    let hasMore = false;
    const loaded = [];
    for (let page = 0; page < INITIAL_EVENT_PAGES; page += 1) {
      const response = await fetchEventsPage(after);
      loaded.push(...response.data);
      hasMore = response.has_more;
      if (!hasMore || !response.data.length) break;
      after = response.data[response.data.length - 1].id;
    }
    if (loaded.length) newestEventId = loaded[0].id;
    appendOlder(loaded);
    el("load-older-events").hidden = !hasMore;
    return loaded.slice().reverse();
  }

  el("load-older-events").addEventListener("click", async () => {
    const button = el("load-older-events");
    button.disabled = true;
    el("events-status").textContent = "Loading older events…";
    try {
      const response = await fetchEventsPage(oldestEventId);
      appendOlder(response.data);
      button.hidden = !response.has_more;
      el("events-status").textContent = response.has_more ? "" : "That is the first event of the job.";
    } catch (error) {
      el("events-status").textContent = `Older events could not be loaded: ${error.message}`;
    } finally {
      button.disabled = false;
    }
  });

  // ----------------------------------------------------------------------------------------------------- socket

  let retryDelayMs = 500;

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const query = newestEventId ? `?after=${encodeURIComponent(newestEventId)}` : "";
    const socket = new WebSocket(`${scheme}://${window.location.host}/ws/fine_tuning/jobs/${job.id}/${query}`);
    socket.onopen = () => {
      retryDelayMs = 500;
      el("connection").textContent = "live";
    };
    socket.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (data.object === "fine_tuning.job.event") showLiveEvent(data);
      else if (data.object === "fine_tuning.job") showJob(data);
    };
    socket.onclose = (closeEvent) => {
      if (closeEvent.code === 4404 || closeEvent.code === 4401) {
        el("connection").textContent = "not available";
        return;
      }
      el("connection").textContent = "reconnecting…";
      setTimeout(connect, retryDelayMs);
      retryDelayMs = Math.min(retryDelayMs * 2, 10000);
    };
  }

  // ------------------------------------------------------------------------------------------------ checkpoints

  let checkpointRefresh = null;

  function refreshCheckpointsSoon() {
    clearTimeout(checkpointRefresh);
    checkpointRefresh = setTimeout(refreshCheckpoints, 300);
  }

  function metricsCell(metrics) {
    const cell = document.createElement("td");
    for (const [name, value] of Object.entries(metrics || {})) {
      if (name === "step") continue;
      const metric = document.createElement("span");
      metric.className = "metric";
      const label = document.createElement("span");
      label.className = "metric-name";
      label.textContent = name;
      metric.append(label, ` ${formatNumber(value)}`);
      cell.append(metric, " ");
    }
    return cell;
  }

  async function refreshCheckpoints() {
    try {
      const response = await apiRequest("GET", `${jobPath}/checkpoints?limit=${CHECKPOINTS_SHOWN}`);
      const body = el("checkpoints").tBodies[0];
      const rows = response.data.map((checkpoint) => {
        const row = document.createElement("tr");
        row.dataset.checkpointId = checkpoint.id;
        const step = document.createElement("td");
        step.textContent = checkpoint.step_number;
        const id = document.createElement("td");
        const code = document.createElement("code");
        code.textContent = checkpoint.id;
        id.append(code);
        const saved = document.createElement("td");
        const time = document.createElement("time");
        time.dateTime = new Date(checkpoint.created_at * 1000).toISOString();
        time.textContent = formatTime(checkpoint.created_at);
        saved.append(time);
        row.append(step, id, metricsCell(checkpoint.metrics), saved);
        return row;
      });
      body.replaceChildren(...rows);
    } catch (error) {
      el("job-action-status").textContent = `Checkpoints could not be refreshed: ${error.message}`;
    }
  }

  // -------------------------------------------------------------------------------------------- cancel/pause/resume

  function jobAction(buttonId, action, doneMessage) {
    el(buttonId).addEventListener("click", async () => {
      const button = el(buttonId);
      button.disabled = true;
      try {
        showJob(await apiRequest("POST", `${jobPath}/${action}`));
        el("job-action-status").textContent = doneMessage;
      } catch (error) {
        showError(error.message);
        // The job moved on meanwhile (say it finished): show what it is now, so the buttons match its status.
        apiRequest("GET", jobPath).then(showJob, () => {
          button.disabled = false;
        });
      }
    });
  }

  jobAction("cancel-job", "cancel", "Cancellation requested.");
  jobAction("pause-job", "pause", "Pause requested: a running job stops after its current step and saves a checkpoint.");
  jobAction("resume-job", "resume", "Resumed: the job is queued again and continues from its last checkpoint.");

  // ------------------------------------------------------------------------------------------------ evaluations

  const evaluationsShown = new Map();

  function evaluationSummary(evaluation) {
    if (evaluation.status === "failed") return evaluation.error ? evaluation.error.message : "failed";
    if (!evaluation.metrics) return "";
    return Object.entries(evaluation.metrics).map(([name, value]) => `${name} ${formatNumber(value)}`).join(" · ");
  }

  function showEvaluationRow(evaluation) {
    const body = el("evaluations").tBodies[0];
    let row = evaluationsShown.get(evaluation.id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.evaluationId = evaluation.id;
      evaluationsShown.set(evaluation.id, row);
      body.prepend(row);
    }
    const cells = [evaluation.id, evaluation.file, evaluation.status, evaluationSummary(evaluation)].map((text, index) => {
      const cell = document.createElement("td");
      if (index < 2) {
        const code = document.createElement("code");
        code.textContent = text;
        cell.append(code);
      } else {
        cell.textContent = text;
      }
      if (index === 2) cell.className = `status-${evaluation.status}`;
      return cell;
    });
    row.replaceChildren(...cells);
  }

  function showSamples(evaluation) {
    if (!evaluation.samples || !evaluation.samples.length) return;
    el("samples-card").hidden = false;
    el("samples-source").textContent = `From evaluation ${evaluation.id} on ${evaluation.file}.`;
    const rows = evaluation.samples.map((sample) => {
      const row = document.createElement("tr");
      row.className = sample.correct ? "sample-correct" : "sample-wrong";
      for (const text of [sample.input, sample.reference, sample.prediction, sample.correct ? "yes" : "no"]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    });
    el("samples").tBodies[0].replaceChildren(...rows);
  }

  async function loadEvaluations() {
    try {
      const response = await apiRequest("GET", `${jobPath}/evaluations`);
      for (const evaluation of response.data.slice().reverse()) {
        showEvaluationRow(evaluation);
        if (evaluation.status === "queued" || evaluation.status === "running") pollEvaluation(evaluation.id);
      }
    } catch (error) {
      el("evaluation-status").textContent = `Evaluations could not be loaded: ${error.message}`;
    }
  }

  function pollEvaluation(evaluationId) {
    const poll = async () => {
      try {
        const evaluation = await apiRequest("GET", `${jobPath}/evaluations/${encodeURIComponent(evaluationId)}`);
        showEvaluationRow(evaluation);
        if (evaluation.status === "succeeded" || evaluation.status === "failed") {
          el("evaluation-status").textContent = `Evaluation ${evaluation.id} ${evaluation.status}. ${evaluationSummary(evaluation)}`;
          if (evaluation.status === "succeeded") showSamples(evaluation);
          return;
        }
        el("evaluation-status").textContent = `Evaluation ${evaluation.id} is ${evaluation.status}…`;
      } catch (error) {
        el("evaluation-status").textContent = `Evaluation status unavailable (${error.message}); retrying…`;
      }
      setTimeout(poll, EVALUATION_POLL_MS);
    };
    setTimeout(poll, EVALUATION_POLL_MS);
  }

  el("evaluate-form").addEventListener("submit", async (submitEvent) => {
    submitEvent.preventDefault();
    const form = submitEvent.target;
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    el("evaluation-status").textContent = "Starting the evaluation…";
    try {
      const evaluation = await apiRequest("POST", `${jobPath}/evaluations`, {
        file: form.file.value,
        max_examples: Number(form.max_examples.value),
      });
      showEvaluationRow(evaluation);
      el("evaluation-status").textContent = `Evaluation ${evaluation.id} is ${evaluation.status}…`;
      pollEvaluation(evaluation.id);
    } catch (error) {
      el("evaluation-status").textContent = error.message;
    } finally {
      button.disabled = false;
    }
  });

  // ----------------------------------------------------------------------------------------------------- deploy

  // Serving the model is one POST away: the endpoint's own page then follows the deployment.
  el("deploy-job-form").addEventListener("submit", async (submitEvent) => {
    submitEvent.preventDefault();
    const status = el("deploy-job-status");
    el("deploy-job-submit").disabled = true;
    status.className = "";
    status.textContent = "Deploying…";
    try {
      const endpoint = await apiRequest("POST", "/v1/endpoints", {
        name: el("deploy-job-name").value.trim(),
        model: job.id,
        checkpoint: el("deploy-job-checkpoint").value || null,
      });
      window.location.assign(`/endpoints/${encodeURIComponent(endpoint.id)}/`);
    } catch (error) {
      status.textContent = error.message;
      status.className = "error";
      el("deploy-job-submit").disabled = false;
    }
  });

  // --------------------------------------------------------------------------------------------------- generate

  el("generate-form").addEventListener("submit", async (submitEvent) => {
    submitEvent.preventDefault();
    const form = submitEvent.target;
    const output = el("generate-output");
    output.textContent = "…";
    try {
      const result = await apiRequest("POST", `${jobPath}/generate`, {
        prompt: form.prompt.value,
        max_tokens: Number(form.max_tokens.value),
        temperature: Number(form.temperature.value),
      });
      output.textContent = form.prompt.value + result.choices[0].text;
    } catch (error) {
      output.textContent = error.message;
    }
  });

  // ------------------------------------------------------------------------------------------------------- start

  async function start() {
    showJob(job, { live: false });
    if (job.status === "succeeded") loadEvaluations();
    let latestEvents = null;
    const loadEvents = loadLatestEvents().then(
      (events) => {
        latestEvents = events;
      },
      (error) => {
        el("events-status").textContent = `Events could not be loaded: ${error.message}; retrying…`;
      },
    );
    await Promise.all([loadSeries(), loadEvents]);
    // The events written since the series was read (or just before): merged per step like live ones.
    for (const event of latestEvents || []) applyEventData(event, { live: false });
    const lastMetrics = (latestEvents || []).filter((event) => event.type === "metrics" && event.data).pop();
    if (lastMetrics) showRates(lastMetrics.data);
    chartsReady = true;
    pendingAppends = [];
    pendingRedraw = false;
    drawCharts();
    connectAfterEventsLoaded(latestEvents !== null);
  }

  // Without the newest event's id the socket would replay the job's whole log: the REST page is tried again first.
  async function connectAfterEventsLoaded(eventsLoaded) {
    if (eventsLoaded) {
      connect();
      return;
    }
    try {
      await loadLatestEvents();
      el("events-status").textContent = "";
      connect();
    } catch (error) {
      setTimeout(() => connectAfterEventsLoaded(false), 3000);
    }
  }

  // The server wrote the timeline in UTC; shown in the reader's local time, like the entries added live.
  for (const time of document.querySelectorAll("#status-timeline time[datetime]")) {
    time.textContent = new Date(time.dateTime).toLocaleString();
  }

  start();
})();
