"use strict";

// Token preview: the same labels the trainer computes, shown as coloured tokens. User text is only ever placed
// with textContent, never as HTML.
(function () {
  const form = document.getElementById("preview-form");
  if (!form) return;
  const fileId = form.dataset.fileId;
  const output = document.getElementById("preview-output");
  const status = document.getElementById("preview-status");

  function visible(text) {
    return text.replace(/\n/g, "⏎\n").replace(/ /g, "·");
  }

  function render(examples) {
    output.replaceChildren();
    for (const example of examples) {
      const block = document.createElement("div");
      block.className = "preview-example";
      const heading = document.createElement("p");
      heading.className = "hint";
      heading.textContent = `Line ${example.line}: ${example.num_tokens} tokens, ${example.num_trained} trained${example.truncated ? ", truncated" : ""}`;
      block.append(heading);
      const tokens = document.createElement("p");
      tokens.className = "tokens";
      for (const token of example.tokens) {
        const span = document.createElement("span");
        span.className = `token ${token.trained ? "trained" : "masked"}`;
        span.title = `id ${token.id}`;
        span.textContent = visible(token.text);
        tokens.append(span);
      }
      block.append(tokens);
      output.append(block);
    }
  }

  form.addEventListener("submit", async (submitEvent) => {
    submitEvent.preventDefault();
    const query = new URLSearchParams(new FormData(form));
    status.textContent = "…";
    status.className = "";
    try {
      const result = await apiRequest("GET", `/v1/files/${fileId}/preview?${query}`);
      render(result.data);
      status.textContent = `${result.data.length} examples`;
    } catch (error) {
      status.textContent = error.message;
      status.className = "error";
    }
  });

  document.getElementById("revalidate").addEventListener("click", async () => {
    try {
      await apiRequest("POST", `/v1/files/${fileId}/validate`, {
        tokenizer: form.tokenizer.value,
        max_length: Number(form.max_length.value),
      });
      status.textContent = "Recounting on a worker; reload in a few seconds to see token lengths.";
      status.className = "";
    } catch (error) {
      status.textContent = error.message;
      status.className = "error";
    }
  });
})();
