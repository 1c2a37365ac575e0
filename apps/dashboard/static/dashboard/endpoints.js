"use strict";

// The endpoints list (deploy form, each row's requests of the last 24 h) and one endpoint's page (live status,
// redeploy, undeploy, defaults, usage charts, snippets). Both read and write through the REST API under /v1, the one
// SDK users call; the playground and the predict box live in playground.js.
(function () {
  const el = (id) => document.getElementById(id);
  const STATUS_POLL_MS = 2000;
  const USAGE_REFRESH_MS = 30000;
  // Endpoint names travel as OpenAI's `model`: keep them to characters that need no quoting anywhere.
  const NAME_PATTERN = /^[a-zA-Z0-9][a-zA-Z0-9._-]*$/;

  const endpointPath = (id) => `/v1/endpoints/${encodeURIComponent(id)}`;

  function suggestedName(jobId, suffix) {
    const base = (suffix || jobId || "model").toLowerCase().replace(/[^a-z0-9._-]+/g, "-").replace(/^[^a-z0-9]+/, "");
    return (base || "model").slice(0, 64);
  }

  function numberOrNull(id) {
    const input = el(id);
    return input && input.value !== "" ? Number(input.value) : null;
  }

  function withoutNulls(object) {
    return Object.fromEntries(Object.entries(object).filter(([, value]) => value !== null && value !== undefined));
  }

  function setStatusText(element, status) {
    element.textContent = status;
    element.className = `status-${status}`;
  }

  // A job's saved checkpoints as options after "Final model"; `keep` stays selected when it is still among them.
  async function fillCheckpoints(select, jobId, keep) {
    const first = select.options[0];
    select.replaceChildren(first);
    if (!jobId) return;
    try {
      const page = await apiRequest("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints?limit=100`);
      for (const checkpoint of page.data || []) {
        const option = new Option(`step ${checkpoint.step_number} (${checkpoint.id})`, checkpoint.id);
        option.selected = checkpoint.id === keep;
        select.append(option);
      }
    } catch (error) {
      // Without the list the final model can still be deployed; say why the choice is short.
      select.append(new Option(`Checkpoints unavailable: ${error.message}`, "", false, false));
      select.options[select.options.length - 1].disabled = true;
    }
  }

  // The usage API's totals, whether nested under `totals` (the contract) or at the top level with `latency_ms`
  // and `time_to_first_token_ms` objects (what apps/endpoints answers today).
  function usageTotals(usage) {
    if (usage.totals) return usage.totals;
    const latency = usage.latency_ms || {};
    return {
      requests: usage.requests,
      errors: usage.errors,
      prompt_tokens: usage.prompt_tokens,
      completion_tokens: usage.completion_tokens,
      latency_p50_ms: latency.p50,
      latency_p95_ms: latency.p95,
      time_to_first_token_p50_ms: (usage.time_to_first_token_ms || {}).p50,
    };
  }

  // ---------------------------------------------------------------------------------------------------- list page

  function initList() {
    const table = el("endpoint-list");
    if (!table) return;
    const rows = Array.from(table.querySelectorAll("tr[data-endpoint-id]"));

    async function showRequests(row) {
      const cell = row.querySelector(".endpoint-requests");
      try {
        const usage = await apiRequest("GET", `${endpointPath(row.dataset.endpointId)}/usage?window=24h`);
        cell.textContent = String(usageTotals(usage).requests || 0);
      } catch (error) {
        cell.textContent = "—";
        cell.title = error.message;
      }
    }

    // Rows still deploying follow the API until they settle, so nobody has to reload the list to see "ready".
    async function pollDeploying() {
      const deploying = rows.filter((row) => row.querySelector(".endpoint-status span").textContent.trim() === "deploying");
      for (const row of deploying) {
        try {
          const endpoint = await apiRequest("GET", endpointPath(row.dataset.endpointId));
          setStatusText(row.querySelector(".endpoint-status span"), endpoint.status);
          if (endpoint.revision !== undefined) row.querySelector(".endpoint-revision").textContent = endpoint.revision;
          if (endpoint.task) row.querySelector(".endpoint-task").textContent = endpoint.task;
        } catch (error) {
          // A failed poll is retried on the next tick; the row keeps its last known status.
        }
      }
      if (deploying.length) setTimeout(pollDeploying, STATUS_POLL_MS);
    }

    rows.forEach(showRequests);
    pollDeploying();
  }

  function initDeployForm() {
    const form = el("deploy-form");
    if (!form) return;
    const jobSelect = el("deploy-job");
    const nameInput = el("deploy-name");
    let nameTouched = false;
    nameInput.addEventListener("input", () => {
      nameTouched = true;
    });

    function jobChanged() {
      const option = jobSelect.selectedOptions[0];
      if (!option) return;
      if (!nameTouched) nameInput.value = suggestedName(option.value, option.dataset.suffix);
      fillCheckpoints(el("deploy-checkpoint"), option.value, "");
    }
    jobSelect.addEventListener("change", jobChanged);
    jobChanged();

    form.addEventListener("submit", async (submitEvent) => {
      submitEvent.preventDefault();
      const status = el("deploy-status");
      const name = nameInput.value.trim();
      if (!NAME_PATTERN.test(name)) {
        status.textContent = "Give the endpoint a name of letters, digits, dots, dashes or underscores, starting with a letter or digit.";
        status.className = "error";
        nameInput.focus();
        return;
      }
      el("deploy-submit").disabled = true;
      status.className = "";
      status.textContent = "Deploying…";
      try {
        const endpoint = await apiRequest("POST", "/v1/endpoints", withoutNulls({
          name,
          model: jobSelect.value,
          checkpoint: el("deploy-checkpoint").value || null,
          generation_defaults: withoutNulls({
            max_tokens: numberOrNull("deploy-max-tokens"),
            temperature: numberOrNull("deploy-temperature"),
            top_p: numberOrNull("deploy-top-p"),
          }),
          min_replicas: numberOrNull("deploy-min-replicas"),
          max_replicas: numberOrNull("deploy-max-replicas"),
          idle_unload_seconds: numberOrNull("deploy-idle-unload"),
        }));
        window.location.assign(`/endpoints/${encodeURIComponent(endpoint.id)}/`);
      } catch (error) {
        status.textContent = error.message;
        status.className = "error";
        el("deploy-submit").disabled = false;
      }
    });
  }

  // -------------------------------------------------------------------------------------------------- detail page

  function initDetail() {
    const data = el("endpoint-data");
    if (!data) return;
    const page = JSON.parse(data.textContent);
    let pollTimer = null;

    function showEndpoint(endpoint) {
      page.status = endpoint.status;
      setStatusText(el("endpoint-status"), endpoint.status);
      // `job` in the contract, `fine_tuning_job` in the API's JSON today: either names the job served.
      const jobId = endpoint.job || endpoint.fine_tuning_job;
      if (endpoint.fine_tuned_model || endpoint.model) {
        const model = el("endpoint-model");
        model.replaceChildren(document.createTextNode(`${endpoint.fine_tuned_model || endpoint.model} `));
        if (jobId) {
          const link = document.createElement("a");
          link.href = `/jobs/${encodeURIComponent(jobId)}/`;
          const code = document.createElement("code");
          code.textContent = jobId;
          link.append(code);
          model.append("(", link, ")");
        }
      }
      el("endpoint-checkpoint").textContent = endpoint.checkpoint || "final model";
      if (endpoint.revision !== undefined && endpoint.revision !== null) el("endpoint-revision").textContent = endpoint.revision;
      if (endpoint.updated_at) {
        // Unix seconds like OpenAI's objects; an ISO string is read as it is.
        const when = typeof endpoint.updated_at === "number" ? new Date(endpoint.updated_at * 1000) : new Date(endpoint.updated_at);
        el("endpoint-updated").textContent = when.toLocaleString();
      }
      if (endpoint.task) {
        page.task = endpoint.task;
        el("endpoint-task").textContent = endpoint.task;
        el("playground-card").hidden = endpoint.task === "classification";
        el("predict-card").hidden = endpoint.task !== "classification";
      }
      const error = endpoint.error && (endpoint.error.message || endpoint.error);
      el("endpoint-error").textContent = error || "";
      el("endpoint-error").hidden = !error;
      const stopped = endpoint.status === "stopped";
      el("undeploy-endpoint").hidden = stopped;
      el("start-endpoint").hidden = !stopped;
      el("endpoint-refresh").textContent = endpoint.status === "deploying" ? "deploying: checking every 2 s…" : "";
    }

    async function refresh() {
      pollTimer = null;
      try {
        showEndpoint(await apiRequest("GET", endpointPath(page.id)));
      } catch (error) {
        el("endpoint-refresh").textContent = `Could not refresh: ${error.message}`;
      }
      if (page.status === "deploying") pollTimer = setTimeout(refresh, STATUS_POLL_MS);
    }

    function followDeployment() {
      if (pollTimer) clearTimeout(pollTimer);
      refresh();
    }

    // Undeploy frees the replicas but keeps the endpoint (name, defaults, usage) so it can be started again;
    // Delete removes it. Both ask first: clients calling it start failing at once.
    function stateButton(buttonId, state, question, doing, done) {
      el(buttonId).addEventListener("click", async () => {
        if (question && !window.confirm(question)) return;
        const status = el("endpoint-action-status");
        el(buttonId).disabled = true;
        status.textContent = doing;
        try {
          const endpoint = await apiRequest("POST", endpointPath(page.id), { state });
          showEndpoint(endpoint);
          status.textContent = done;
          if (endpoint.status === "deploying") followDeployment();
        } catch (error) {
          status.textContent = error.message;
        } finally {
          el(buttonId).disabled = false;
        }
      });
    }
    stateButton("undeploy-endpoint", "stopped", `Undeploy ${page.name}? Requests to it will fail until it is started again.`, "Undeploying…", "Undeployed.");
    stateButton("start-endpoint", "active", null, "Starting…", "Starting.");

    el("delete-endpoint").addEventListener("click", async () => {
      if (!window.confirm(`Delete ${page.name}? Its name becomes free; its usage stays in the team's totals.`)) return;
      const status = el("endpoint-action-status");
      el("delete-endpoint").disabled = true;
      status.textContent = "Deleting…";
      try {
        await apiRequest("DELETE", endpointPath(page.id));
        window.location.assign("/endpoints/");
      } catch (error) {
        status.textContent = error.message;
        el("delete-endpoint").disabled = false;
      }
    });

    const redeployJob = el("redeploy-job");
    redeployJob.addEventListener("change", () => fillCheckpoints(el("redeploy-checkpoint"), redeployJob.value, ""));
    fillCheckpoints(el("redeploy-checkpoint"), redeployJob.value, el("redeploy-checkpoint").dataset.current);
    el("redeploy-form").addEventListener("submit", async (submitEvent) => {
      submitEvent.preventDefault();
      const status = el("redeploy-status");
      el("redeploy-submit").disabled = true;
      status.className = "";
      status.textContent = "Starting a new revision…";
      try {
        const endpoint = await apiRequest("POST", endpointPath(page.id), {
          model: redeployJob.value,
          checkpoint: el("redeploy-checkpoint").value || null,
        });
        showEndpoint(endpoint);
        status.textContent = `Revision ${endpoint.revision ?? ""} is ${endpoint.status}.`;
        followDeployment();
      } catch (error) {
        status.textContent = error.message;
        status.className = "error";
      } finally {
        el("redeploy-submit").disabled = false;
      }
    });

    el("defaults-form").addEventListener("submit", async (submitEvent) => {
      submitEvent.preventDefault();
      const status = el("defaults-status");
      el("defaults-submit").disabled = true;
      status.className = "";
      try {
        const endpoint = await apiRequest("POST", endpointPath(page.id), withoutNulls({
          generation_defaults: withoutNulls({
            max_tokens: numberOrNull("defaults-max-tokens"),
            temperature: numberOrNull("defaults-temperature"),
            top_p: numberOrNull("defaults-top-p"),
          }),
          min_replicas: numberOrNull("defaults-min-replicas"),
          max_replicas: numberOrNull("defaults-max-replicas"),
          idle_unload_seconds: numberOrNull("defaults-idle-unload"),
        }));
        showEndpoint(endpoint);
        status.textContent = "Saved.";
        if (endpoint.status === "deploying") followDeployment();
      } catch (error) {
        status.textContent = error.message;
        status.className = "error";
      } finally {
        el("defaults-submit").disabled = false;
      }
    });

    const keysForm = el("keys-form");
    if (keysForm && el("keys-submit")) {
      keysForm.addEventListener("submit", async (submitEvent) => {
        submitEvent.preventDefault();
        const status = el("keys-status");
        el("keys-submit").disabled = true;
        status.className = "";
        try {
          const chosen = [...keysForm.querySelectorAll('input[name="api_keys"]:checked')].map((box) => box.value);
          const endpoint = await apiRequest("POST", endpointPath(page.id), { api_keys: chosen });
          status.textContent = endpoint.api_keys.length
            ? `Saved: ${endpoint.api_keys.length} key(s) limited to this endpoint.`
            : "Saved: no key is limited to this endpoint.";
        } catch (error) {
          status.textContent = error.message;
          status.className = "error";
        } finally {
          el("keys-submit").disabled = false;
        }
      });
    }

    initUsage(page);
    initCopyButtons();
    TunehousePlayground.initPlayground(page);
    TunehousePlayground.initPredict(page);
    refresh();
  }

  // ------------------------------------------------------------------------------------------------- usage charts

  function usageLayout(title, yTitle, extra) {
    const layout = TunehouseCharts.layout(title, yTitle, { showLegend: true });
    // The shared layout is made for steps; usage buckets are instants, so the x axis is a date axis here.
    layout.xaxis = { type: "date", zeroline: false };
    return Object.assign(layout, extra || {});
  }

  // Buckets may come without latency (the usage API reports it for the whole window only): say so on the chart
  // rather than drawing an empty one that reads as "no traffic".
  function latencyLayout(series, layout) {
    const hasLatency = series.some((bucket) => bucket.latency_p50_ms !== undefined && bucket.latency_p50_ms !== null);
    if (series.length && !hasLatency) {
      layout.annotations = [{ text: "latency per bucket not reported: see the totals", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
    }
    return layout;
  }

  function drawUsage(series) {
    // Each bucket's start in unix seconds (`t` in the API contract, `at` in the usage selector's rows).
    const x = series.map((bucket) => new Date((bucket.t ?? bucket.at) * 1000));
    const column = (key) => series.map((bucket) => bucket[key] ?? null);
    const empty = series.length === 0;
    const annotate = (layout) => {
      if (empty) layout.annotations = [{ text: "no requests in this window", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
      return layout;
    };
    Plotly.react(
      el("usage-chart-requests"),
      [
        { x, y: column("requests"), name: "requests", type: "bar" },
        { x, y: column("errors"), name: "errors", type: "bar", marker: { color: "#c62828" } },
      ],
      annotate(usageLayout("Requests", "requests", { barmode: "group" })),
      TunehouseCharts.CONFIG,
    );
    Plotly.react(
      el("usage-chart-tokens"),
      [
        { x, y: column("prompt_tokens"), name: "prompt", type: "bar" },
        { x, y: column("completion_tokens"), name: "completion", type: "bar" },
      ],
      annotate(usageLayout("Tokens", "tokens", { barmode: "stack" })),
      TunehouseCharts.CONFIG,
    );
    Plotly.react(
      el("usage-chart-latency"),
      [
        { x, y: column("latency_p50_ms"), name: "p50", type: "scatter", mode: "lines+markers", connectgaps: false },
        { x, y: column("latency_p95_ms"), name: "p95", type: "scatter", mode: "lines+markers", connectgaps: false },
      ],
      latencyLayout(series, annotate(usageLayout("Latency", "ms"))),
      TunehouseCharts.CONFIG,
    );
    for (const id of ["usage-chart-requests", "usage-chart-tokens", "usage-chart-latency"]) el(id).dataset.empty = String(empty);
  }

  function showTotals(totals) {
    const value = (key) => (totals[key] === null || totals[key] === undefined ? "—" : String(totals[key]));
    el("usage-requests").textContent = value("requests");
    el("usage-errors").textContent = value("errors");
    el("usage-prompt-tokens").textContent = value("prompt_tokens");
    el("usage-completion-tokens").textContent = value("completion_tokens");
    const ms = (key) => (totals[key] === null || totals[key] === undefined ? "—" : `${Math.round(totals[key])} ms`);
    el("usage-latency").textContent = `${ms("latency_p50_ms")} / ${ms("latency_p95_ms")}`;
    el("usage-ttft").textContent = ms("time_to_first_token_p50_ms");
  }

  function initUsage(page) {
    const windowSelect = el("usage-window");
    let timer = null;
    async function load() {
      if (timer) clearTimeout(timer);
      try {
        const usage = await apiRequest("GET", `${endpointPath(page.id)}/usage?window=${encodeURIComponent(windowSelect.value)}`);
        showTotals(usageTotals(usage));
        drawUsage(usage.series || []);
        el("usage-note").textContent = "";
      } catch (error) {
        el("usage-note").textContent = `Usage unavailable: ${error.message}`;
      }
      // Traffic keeps arriving while the page is open; a hidden tab does not need fresh charts.
      timer = setTimeout(() => (document.hidden ? null : load()), USAGE_REFRESH_MS);
    }
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) load();
    });
    windowSelect.addEventListener("change", load);
    load();
  }

  // ----------------------------------------------------------------------------------------------------- snippets

  function initCopyButtons() {
    for (const button of document.querySelectorAll("button[data-copy]")) {
      button.addEventListener("click", async () => {
        const text = el(button.dataset.copy).textContent;
        try {
          await navigator.clipboard.writeText(text);
          el("copy-status").textContent = "Copied to the clipboard.";
        } catch (error) {
          // Clipboard access needs a secure context (https or localhost): select the text for a manual copy instead.
          const range = document.createRange();
          range.selectNodeContents(el(button.dataset.copy));
          window.getSelection().removeAllRanges();
          window.getSelection().addRange(range);
          el("copy-status").textContent = "Copying is not allowed here: the snippet is selected, press Ctrl+C.";
        }
      });
    }
  }

  initList();
  initDeployForm();
  initDetail();
})();
