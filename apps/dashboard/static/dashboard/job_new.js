"use strict";

document.getElementById("job-form").addEventListener("submit", async (submitEvent) => {
  submitEvent.preventDefault();
  const form = submitEvent.target;
  const status = document.getElementById("job-status");
  const hyperparameters = {};
  for (const input of form.querySelectorAll("[data-hyperparameter]")) {
    if (input.value !== "") hyperparameters[input.name] = Number(input.value);
  }
  try {
    const job = await apiRequest("POST", "/v1/fine_tuning/jobs", {
      model: form.model.value,
      training_file: form.training_file.value,
      hyperparameters,
    });
    window.location.href = `/jobs/${job.id}/`;
  } catch (error) {
    status.textContent = error.message;
    status.className = "error";
  }
});
