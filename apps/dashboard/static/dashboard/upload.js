"use strict";

// Upload with XMLHttpRequest: fetch() cannot report upload progress.
document.getElementById("upload-form").addEventListener("submit", (submitEvent) => {
  submitEvent.preventDefault();
  const input = document.getElementById("upload-file");
  const status = document.getElementById("upload-status");
  const bar = document.getElementById("upload-progress");
  if (!input.files.length) return;
  const body = new FormData();
  body.append("purpose", "fine-tune");
  body.append("file", input.files[0]);
  const columns = document.getElementById("upload-columns").value.trim();
  if (columns) body.append("column_mapping", columns);
  const request = new XMLHttpRequest();
  request.open("POST", "/v1/files");
  request.setRequestHeader("X-CSRFToken", csrfToken());
  bar.hidden = false;
  bar.value = 0;
  request.upload.onprogress = (progress) => {
    if (progress.lengthComputable) bar.value = Math.round((100 * progress.loaded) / progress.total);
  };
  request.onload = () => {
    const data = JSON.parse(request.responseText || "{}");
    if (request.status >= 400) {
      status.textContent = (data.error && data.error.message) || `Upload failed (${request.status})`;
      status.className = "error";
      return;
    }
    bar.value = 100;
    status.className = "";
    status.textContent = `Uploaded ${data.filename} as ${data.id}; checking it…`;
    window.location.reload();
  };
  request.onerror = () => {
    status.textContent = "Upload failed: the server could not be reached.";
    status.className = "error";
  };
  request.send(body);
});
