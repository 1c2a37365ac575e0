"use strict";

// The compare page takes one comma-separated list (?jobs=id1,id2), which a plain form of checkboxes cannot send.
document.getElementById("compare-form").addEventListener("submit", (submitEvent) => {
  submitEvent.preventDefault();
  const form = submitEvent.target;
  const status = document.getElementById("compare-status");
  const chosen = Array.from(document.querySelectorAll('input[name="jobs"][form="compare-form"]:checked'), (box) => box.value);
  if (chosen.length < 2) {
    status.textContent = "Select at least two jobs to compare.";
    return;
  }
  status.textContent = "";
  window.location.assign(`${form.action}?jobs=${chosen.map(encodeURIComponent).join(",")}`);
});
