"use strict";

// Compare runs: the picker says how many runs are ticked (and when that is more than can be compared), the table
// can hide the rows that are the same for every run, and the curves of every run are overlaid, one trace each.
(function () {
  const el = (id) => document.getElementById(id);

  function watchPicker() {
    const form = el("compare-form");
    const maxJobs = Number(form.dataset.maxJobs);
    const boxes = Array.from(form.querySelectorAll("input[name=jobs]"));
    const update = () => {
      const picked = boxes.filter((box) => box.checked).length;
      el("compare-picked").textContent = picked > maxJobs
        ? `${picked} runs ticked: only the first ${maxJobs} will be compared.`
        : `${picked} of at most ${maxJobs} ticked.`;
      el("compare-picked").classList.toggle("error", picked > maxJobs);
    };
    form.addEventListener("change", update);
    update();
  }

  function watchDifferencesToggle() {
    const toggle = el("only-differences");
    if (!toggle) return;
    const apply = () => el("compare-table").classList.toggle("only-differences", toggle.checked);
    toggle.addEventListener("change", apply);
    apply();
  }

  async function drawCurves() {
    const data = document.getElementById("compare-jobs");
    if (!data) return;
    const jobs = JSON.parse(data.textContent);
    const results = await Promise.all(
      jobs.map((job) => TunehouseCharts.fetchSeries(job.id).then((series) => ({ job, series }), (error) => ({ job, error }))),
    );
    const failed = results.filter((result) => result.error);
    const loaded = results.filter((result) => !result.error);
    const lossTraces = loaded.map(({ job, series }) => TunehouseCharts.trace(series.data, "train_loss", job.label));
    const learningRateTraces = loaded.map(({ job, series }) => TunehouseCharts.trace(series.data, "learning_rate", job.label));
    const validationTraces = loaded
      .map(({ job, series }) => {
        const key = TunehouseCharts.validationLossKey(series.evaluation_metrics || []);
        return key ? TunehouseCharts.trace(series.data, key, job.label, { mode: "lines+markers" }) : null;
      })
      .filter(Boolean);
    TunehouseCharts.draw(el("compare-chart-train-loss"), lossTraces, "Training loss by step", "loss", { showLegend: true });
    TunehouseCharts.draw(el("compare-chart-learning-rate"), learningRateTraces, "Learning rate by step", "learning rate", { showLegend: true });
    if (validationTraces.length) {
      el("compare-chart-validation-loss").hidden = false;
      TunehouseCharts.draw(el("compare-chart-validation-loss"), validationTraces, "Validation loss by step", "loss", { showLegend: true });
    }
    const thinned = loaded.filter(({ series }) => series.downsampled).length;
    const notes = [];
    if (thinned) notes.push(`${thinned} long run(s) drawn from a thinned series (evaluations and last step kept).`);
    if (failed.length) notes.push(`Metrics of ${failed.map(({ job }) => job.id).join(", ")} could not be loaded.`);
    el("compare-charts-note").textContent = notes.join(" ");
  }

  watchPicker();
  watchDifferencesToggle();
  drawCurves();
})();
