"use strict";

// Live job page: one websocket pushes the job's event objects (the same JSON as the REST events list) and job
// snapshots on status changes. On reconnect it asks for events after the last id it has, so nothing is missed.
(function () {
  const job = JSON.parse(document.getElementById("job-data").textContent);
  const seenEventIds = new Set();
  let lastEventId = null;
  let retryDelayMs = 500;
  const finished = new Set(["succeeded", "failed", "cancelled"]);

  const el = (id) => document.getElementById(id);

  function showJob(snapshot) {
    el("job-status").textContent = snapshot.status;
    el("job-status").className = `status-${snapshot.status}`;
    el("job-phase").textContent = `(${snapshot.phase})`;
    if (snapshot.fine_tuned_model) el("fine-tuned-model").textContent = snapshot.fine_tuned_model;
    if (snapshot.error) {
      el("job-error").textContent = snapshot.error.message;
      el("job-error").hidden = false;
    }
    if (snapshot.progress) showProgress(snapshot.progress.step, snapshot.progress.total_steps, snapshot.progress.train_loss);
    el("cancel-job").hidden = finished.has(snapshot.status);
    el("generate-card").hidden = snapshot.status !== "succeeded";
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

  function showEvent(event) {
    if (seenEventIds.has(event.id)) return;
    seenEventIds.add(event.id);
    lastEventId = event.id;
    if (event.type === "metrics" && event.data) {
      showProgress(event.data.step, event.data.total_steps, event.data.train_loss);
      if (event.data.tokens_per_second) el("job-throughput").textContent = `· ${Math.round(event.data.tokens_per_second)} tokens/s`;
    }
    const item = document.createElement("li");
    item.className = `event level-${event.level}`;
    item.dataset.eventId = event.id;
    const time = new Date(event.created_at * 1000).toLocaleTimeString();
    item.textContent = `${time} ${event.message}`;
    el("events").prepend(item);
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const query = lastEventId ? `?after=${encodeURIComponent(lastEventId)}` : "";
    const socket = new WebSocket(`${scheme}://${window.location.host}/ws/fine_tuning/jobs/${job.id}/${query}`);
    socket.onopen = () => {
      retryDelayMs = 500;
      el("connection").textContent = "live";
    };
    socket.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (data.object === "fine_tuning.job.event") showEvent(data);
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

  el("cancel-job").addEventListener("click", async () => {
    try {
      showJob(await apiRequest("POST", `/v1/fine_tuning/jobs/${job.id}/cancel`));
    } catch (error) {
      el("job-error").textContent = error.message;
      el("job-error").hidden = false;
    }
  });

  el("generate-form").addEventListener("submit", async (submitEvent) => {
    submitEvent.preventDefault();
    const form = submitEvent.target;
    const output = el("generate-output");
    output.textContent = "…";
    try {
      const result = await apiRequest("POST", `/v1/fine_tuning/jobs/${job.id}/generate`, {
        prompt: form.prompt.value,
        max_tokens: Number(form.max_tokens.value),
        temperature: Number(form.temperature.value),
      });
      output.textContent = form.prompt.value + result.choices[0].text;
    } catch (error) {
      output.textContent = error.message;
    }
  });

  showJob(job);
  connect();
})();
