"use strict";

// The new-job form: builds the create-job body from the inputs, shows the pre-flight estimate (refreshed, debounced,
// as the form changes) and applies an estimate warning's one-click fix to the inputs it names.

const form = document.getElementById("job-form");
const jobStatus = document.getElementById("job-status");
const preflightStatus = document.getElementById("preflight-status");
const preflightFacts = document.getElementById("preflight-facts");
const preflightWarnings = document.getElementById("preflight-warnings");
const ESTIMATE_DELAY_MS = 400;

function hyperparameterValue(input) {
  const kind = input.dataset.kind;
  if (kind === "bool") {
    // Only a change from the default is sent: the job then records the engine's own default.
    return input.checked === (input.dataset.default === "true") ? undefined : input.checked;
  }
  const raw = input.value.trim();
  if (raw === "") return undefined;
  if (kind === "list") return raw.split(",").map((item) => item.trim()).filter(Boolean);
  if (kind === "choice") return raw;
  if (raw === input.dataset.default) return undefined;
  return Number(raw);
}

function jobBody() {
  const hyperparameters = {};
  for (const input of form.querySelectorAll("[data-hyperparameter]")) {
    const value = hyperparameterValue(input);
    if (value !== undefined) hyperparameters[input.name] = value;
  }
  const body = { model: form.model.value, training_file: form.training_file.value, hyperparameters };
  if (form.validation_file.value) body.validation_file = form.validation_file.value;
  if (form.suffix.value.trim()) body.suffix = form.suffix.value.trim();
  return body;
}

function showTask() {
  const option = form.training_file.selectedOptions[0];
  document.getElementById("job-task").textContent = option ? option.dataset.task || "–" : "–";
}

function gigabytes(bytes) {
  return `${(bytes / 1e9).toFixed(bytes < 1e9 ? 3 : 1)} GB`;
}

function duration(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function percent(share) {
  return share === null || share === undefined ? "–" : `${(share * 100).toFixed(1)}%`;
}

function fact(term, description) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = description;
  preflightFacts.append(dt, dd);
}

function applyFix(changes) {
  for (const { field, value } of changes) {
    const input = form.elements.namedItem(field);
    if (!input) continue;
    if (input.type === "checkbox") input.checked = Boolean(value);
    else input.value = Array.isArray(value) ? value.join(", ") : String(value);
    // Open the section that holds it, so the change is visible.
    const section = input.closest("details");
    if (section) section.open = true;
  }
  scheduleEstimate(0);
}

function showEstimate(estimate) {
  const { data, steps, memory, duration: time } = estimate;
  preflightFacts.replaceChildren();
  fact("Task · mode", `${estimate.task} · ${estimate.mode}`);
  fact("Training examples", `${data.examples.toLocaleString()} (${data.truncated_examples} longer than max_length)`);
  fact("Tokens", `${data.tokens.toLocaleString()} (${data.tokens_source})`);
  if (data.rows_packed !== null) {
    fact("Rows packed", `${data.rows_packed.toLocaleString()} (padding ${percent(data.padding_waste_packed)})`);
  }
  fact("Rows with padding", `${data.rows_with_padding.toLocaleString()} (padding ${percent(data.padding_waste_with_padding)})`);
  fact(
    "Steps",
    `${steps.total.toLocaleString()} (${steps.per_epoch.toLocaleString()} per epoch × ${steps.epochs} epochs; ` +
      `batch ${steps.batch_size} × ${steps.gradient_accumulation_steps} accumulation)`,
  );
  const parts = Object.entries(memory.parts).map(([name, bytes]) => `${name.replace("_", " ")} ${gigabytes(bytes)}`);
  fact(
    `Memory on ${memory.target_device}`,
    `${gigabytes(memory.total_bytes)} of ${gigabytes(memory.device_bytes)}: ${memory.fits ? "fits" : "does NOT fit"} ` +
      `(${memory.precision}; ${parts.join(", ")}; ${memory.trainable_parameters.toLocaleString()} of ` +
      `${memory.parameters.toLocaleString()} parameters trained)`,
  );
  fact("Expected duration", `${duration(time.seconds)} — ${time.description}`);
  preflightFacts.hidden = false;
  preflightFacts.dataset.fits = String(memory.fits);

  preflightWarnings.replaceChildren();
  for (const warning of estimate.warnings) {
    const item = document.createElement("li");
    item.className = "warning";
    item.dataset.code = warning.code;
    const message = document.createElement("span");
    message.textContent = warning.message;
    item.append(message);
    for (const fix of warning.fixes) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "secondary fix";
      button.textContent = fix.label;
      button.addEventListener("click", () => applyFix(fix.changes));
      item.append(" ", button);
    }
    preflightWarnings.append(item);
  }
  preflightStatus.textContent = estimate.warnings.length ? "Estimated, with warnings:" : "Estimated.";
  preflightStatus.className = "hint";
}

let estimateTimer = null;
let estimateSerial = 0;

async function refreshEstimate() {
  if (!form.training_file.value) return;
  const serial = ++estimateSerial;
  preflightStatus.textContent = "Estimating…";
  try {
    const estimate = await apiRequest("POST", "/v1/fine_tuning/jobs/estimate", {
      ...jobBody(),
      target_device: form.target_device.value,
    });
    if (serial === estimateSerial) showEstimate(estimate); // an older answer never overwrites a newer one
  } catch (error) {
    if (serial !== estimateSerial) return;
    preflightFacts.hidden = true;
    preflightWarnings.replaceChildren();
    preflightStatus.textContent = error.message;
    preflightStatus.className = "error";
  }
}

function scheduleEstimate(delay = ESTIMATE_DELAY_MS) {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(refreshEstimate, delay);
}

form.addEventListener("input", () => scheduleEstimate());
form.addEventListener("change", () => {
  showTask();
  scheduleEstimate();
});

form.addEventListener("submit", async (submitEvent) => {
  submitEvent.preventDefault();
  jobStatus.textContent = "Creating the job…";
  jobStatus.className = "";
  try {
    const job = await apiRequest("POST", "/v1/fine_tuning/jobs", jobBody());
    window.location.href = `/jobs/${job.id}/`;
  } catch (error) {
    jobStatus.textContent = error.message;
    jobStatus.className = "error";
  }
});

showTask();
scheduleEstimate(0);
