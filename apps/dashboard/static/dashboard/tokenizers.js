"use strict";

document.getElementById("tokenizer-form").addEventListener("submit", async (submitEvent) => {
  submitEvent.preventDefault();
  const form = submitEvent.target;
  const status = document.getElementById("tokenizer-status");
  const specialTokens = form.special_tokens.value.split(",").map((token) => token.trim()).filter(Boolean);
  try {
    const tokenizer = await apiRequest("POST", "/v1/tokenizers", {
      training_file: form.training_file.value,
      name: form.name.value,
      algorithm: form.algorithm.value,
      vocab_size: Number(form.vocab_size.value),
      special_tokens: specialTokens,
      lowercase: form.lowercase.checked,
    });
    status.className = "";
    status.textContent = `Training ${tokenizer.id} on a worker…`;
    window.setTimeout(() => window.location.reload(), 1500);
  } catch (error) {
    status.textContent = error.message;
    status.className = "error";
  }
});
