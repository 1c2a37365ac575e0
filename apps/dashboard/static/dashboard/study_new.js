"use strict";
// The search-space editor: a new row is a blank copy of the first one under the next row number (the server reads
// whichever numbers arrive); each row enables only the inputs its type uses.
(function () {
  const body = document.getElementById("search-space-rows");
  const addButton = document.getElementById("add-space-row");
  const maxRows = Number(document.getElementById("search-space").dataset.maxRows);
  let nextRow = Number(addButton.dataset.nextRow);

  function syncRow(row) {
    const numeric = row.querySelector("[data-space='type']").value !== "categorical";
    for (const input of row.querySelectorAll("[data-space='low'], [data-space='high'], [data-space='log'], [data-space='step']")) {
      input.disabled = !numeric;
    }
    row.querySelector("[data-space='choices']").disabled = numeric;
  }

  function clearRow(row) {
    row.classList.remove("error");
    for (const control of row.querySelectorAll("input, select")) {
      control.removeAttribute("aria-invalid");
      if (control.type === "checkbox") control.checked = false;
      else if (control.dataset.space === "type") control.value = "float";
      else control.value = "";
    }
    syncRow(row);
  }

  function renumber() {
    Array.from(body.rows).forEach((row, position) => {
      for (const label of row.querySelectorAll("label")) label.textContent = label.textContent.replace(/\d+$/, String(position + 1));
      row.querySelector("[data-remove-row]").setAttribute("aria-label", `Remove row ${position + 1}`);
    });
    addButton.disabled = body.rows.length >= maxRows;
  }

  addButton.addEventListener("click", () => {
    if (body.rows.length >= maxRows) return;
    const row = body.rows[0].cloneNode(true);
    for (const element of row.querySelectorAll("[id], [name], [for]")) {
      for (const attribute of ["id", "name", "for"]) {
        const value = element.getAttribute(attribute);
        if (value) element.setAttribute(attribute, value.replace(/^space-\d+-/, `space-${nextRow}-`));
      }
    }
    nextRow += 1;
    body.appendChild(row);
    clearRow(row);
    renumber();
    row.querySelector("select").focus();
  });
  body.addEventListener("change", (event) => {
    if (event.target.matches("[data-space='type']")) syncRow(event.target.closest("tr"));
  });
  body.addEventListener("click", (event) => {
    const remove = event.target.closest("[data-remove-row]");
    if (!remove) return;
    const row = remove.closest("tr");
    // The last row is cleared, not removed: new rows are copies of it.
    if (body.rows.length === 1) clearRow(row);
    else row.remove();
    renumber();
  });
  for (const row of body.rows) syncRow(row);
  renumber();
})();
