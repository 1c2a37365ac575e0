"use strict";

// Talking to a deployed endpoint from the browser, through the same OpenAI-style routes SDK users call:
// `TunehousePlayground.generate` streams a chat or completion (fetch + ReadableStream, parsing the SSE lines itself
// because EventSource cannot POST), measuring time to first token and total latency as the user saw them. The
// endpoint page's playground and predict box, and the compare page's two columns, are built on it.
const TunehousePlayground = (function () {
  const el = (id) => document.getElementById(id);

  function apiError(data, status) {
    return new Error((data && data.error && data.error.message) || `Request failed (${status})`);
  }

  function requestBody({ mode, model, messages, prompt, params, stream }) {
    const body = Object.assign({ model, stream }, params);
    // OpenAI's way to get the exact token counts at the end of a stream (the last chunk, with no choices).
    if (stream) body.stream_options = { include_usage: true };
    if (mode === "chat") body.messages = messages;
    else body.prompt = prompt;
    return body;
  }

  function deltaText(mode, chunk) {
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return "";
    if (mode === "chat") return (choice.delta && choice.delta.content) || "";
    return choice.text || "";
  }

  // Streams one generation; `onDelta(text)` gets every piece as it arrives. Resolves with the whole text, the usage
  // (the server's when it sent one, else the number of streamed pieces as an estimate), TTFT and latency in ms.
  // An abort through `signal` resolves with what arrived so far and `aborted: true`, not an error.
  async function generate({ mode, model, messages, prompt, params, stream, signal, onDelta }) {
    const path = mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
    const started = performance.now();
    const result = { text: "", usage: null, pieces: 0, ttftMs: null, latencyMs: null, finishReason: null, aborted: false };
    let response;
    try {
      response = await fetch(path, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken(), Accept: stream ? "text/event-stream" : "application/json" },
        body: JSON.stringify(requestBody({ mode, model, messages, prompt, params, stream })),
        signal,
      });
    } catch (error) {
      if (error.name === "AbortError") return Object.assign(result, { aborted: true, latencyMs: performance.now() - started });
      throw error;
    }
    if (!response.ok) throw apiError(await response.json().catch(() => null), response.status);

    const contentType = response.headers.get("Content-Type") || "";
    if (!stream || !contentType.includes("text/event-stream") || !response.body) {
      const data = await response.json();
      const choice = (data.choices && data.choices[0]) || {};
      result.text = mode === "chat" ? (choice.message && choice.message.content) || "" : choice.text || "";
      result.finishReason = choice.finish_reason || null;
      result.usage = data.usage || null;
      result.ttftMs = result.latencyMs = performance.now() - started;
      if (result.text) onDelta(result.text);
      return result;
    }

    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    let done = false;
    try {
      while (!done) {
        const { value, done: streamEnded } = await reader.read();
        if (streamEnded) break;
        buffered += decoder.decode(value, { stream: true });
        // SSE events end with a blank line; a network chunk may cut one anywhere, so only whole lines are parsed.
        const lines = buffered.split("\n");
        buffered = lines.pop();
        for (const rawLine of lines) {
          const line = rawLine.trim();
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") {
            done = true;
            break;
          }
          let chunk;
          try {
            chunk = JSON.parse(payload);
          } catch (parseError) {
            continue; // a malformed line costs one piece, not the whole answer
          }
          if (chunk.error) throw apiError(chunk, response.status);
          if (chunk.usage) result.usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (choice && choice.finish_reason) result.finishReason = choice.finish_reason;
          const text = deltaText(mode, chunk);
          if (!text) continue;
          if (result.ttftMs === null) result.ttftMs = performance.now() - started;
          result.pieces += 1;
          result.text += text;
          onDelta(text);
        }
      }
    } catch (error) {
      if (error.name !== "AbortError") throw error;
      result.aborted = true;
    } finally {
      reader.cancel().catch(() => {});
    }
    result.latencyMs = performance.now() - started;
    return result;
  }

  function formatMs(ms) {
    if (ms === null || ms === undefined) return "—";
    return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
  }

  function describe(result) {
    const parts = [];
    if (result.usage) {
      parts.push(`${result.usage.prompt_tokens ?? "?"} prompt + ${result.usage.completion_tokens ?? "?"} completion tokens`);
    } else if (result.pieces) {
      parts.push(`≈${result.pieces} tokens streamed`);
    }
    parts.push(`TTFT ${formatMs(result.ttftMs)}`, `latency ${formatMs(result.latencyMs)}`);
    const completionTokens = result.usage ? result.usage.completion_tokens : result.pieces;
    const generating = result.latencyMs - (result.ttftMs || 0);
    if (completionTokens > 1 && generating > 0) parts.push(`${((completionTokens - 1) / (generating / 1000)).toFixed(1)} tok/s`);
    if (result.finishReason) parts.push(`finish: ${result.finishReason}`);
    if (result.aborted) parts.push("stopped");
    return parts.join(" · ");
  }

  function numberOrUndefined(input) {
    return input && input.value !== "" ? Number(input.value) : undefined;
  }

  function checkedValue(form, name) {
    const checked = form.querySelector(`input[name=${name}]:checked`);
    return checked ? checked.value : "";
  }

  // ------------------------------------------------------------------------------------- endpoint page: playground

  function initPlayground(endpoint) {
    const form = el("playground-form");
    if (!form) return;
    const output = el("playground-output");
    const conversation = []; // the chat so far, sent whole with every turn like any OpenAI client does
    let controller = null;

    const mode = () => checkedValue(form, "mode") || "chat";
    function showMode() {
      el("playground-chat-fields").hidden = mode() !== "chat";
      el("playground-completion-fields").hidden = mode() === "chat";
    }
    form.addEventListener("change", (event) => {
      if (event.target.name === "mode") showMode();
    });

    function addTurn(role, text) {
      const item = document.createElement("li");
      item.className = `turn turn-${role}`;
      const who = document.createElement("strong");
      who.textContent = `${role}: `;
      const body = document.createElement("span");
      body.textContent = text;
      item.append(who, body);
      el("playground-transcript").append(item);
      return body;
    }

    function setBusy(busy) {
      el("playground-send").disabled = busy;
      el("playground-stop").disabled = !busy;
      output.setAttribute("aria-busy", String(busy));
    }

    el("playground-message").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    el("playground-stop").addEventListener("click", () => controller && controller.abort());
    el("playground-clear").addEventListener("click", () => {
      conversation.length = 0;
      el("playground-transcript").replaceChildren();
      output.textContent = "";
      el("playground-stats").textContent = "";
      el("playground-error").hidden = true;
    });

    form.addEventListener("submit", async (submitEvent) => {
      submitEvent.preventDefault();
      const chosenMode = mode();
      const params = {
        max_tokens: numberOrUndefined(el("playground-max-tokens")),
        temperature: numberOrUndefined(el("playground-temperature")),
        top_p: numberOrUndefined(el("playground-top-p")),
      };
      let messages;
      let prompt;
      let replyTarget = null;
      if (chosenMode === "chat") {
        const text = el("playground-message").value.trim();
        if (!text) return;
        const system = el("playground-system").value.trim();
        conversation.push({ role: "user", content: text });
        messages = (system ? [{ role: "system", content: system }] : []).concat(conversation);
        addTurn("user", text);
        replyTarget = addTurn("assistant", "");
        el("playground-message").value = "";
      } else {
        prompt = el("playground-prompt").value;
      }
      output.textContent = "";
      el("playground-stats").textContent = "Waiting for the first token…";
      el("playground-error").hidden = true;
      controller = new AbortController();
      setBusy(true);
      try {
        const result = await generate({
          mode: chosenMode,
          model: endpoint.name,
          messages,
          prompt,
          params,
          stream: el("playground-stream").checked,
          signal: controller.signal,
          onDelta: (text) => {
            output.textContent += text;
            if (replyTarget) replyTarget.textContent += text;
          },
        });
        if (chosenMode === "chat") conversation.push({ role: "assistant", content: result.text });
        el("playground-stats").textContent = describe(result);
      } catch (error) {
        // The user's turn stays in the transcript but not in the conversation, so "Send" can simply be retried.
        if (chosenMode === "chat") conversation.pop();
        el("playground-error").textContent = error.message;
        el("playground-error").hidden = false;
        el("playground-stats").textContent = "";
      } finally {
        controller = null;
        setBusy(false);
      }
    });
    showMode();
  }

  // ------------------------------------------------------------------------------------- endpoint page: classifier

  function initPredict(endpoint) {
    const form = el("predict-form");
    if (!form) return;
    form.addEventListener("submit", async (submitEvent) => {
      submitEvent.preventDefault();
      const inputs = el("predict-input").value.split("\n").map((line) => line.trim()).filter(Boolean);
      if (!inputs.length) return;
      el("predict-submit").disabled = true;
      el("predict-status").textContent = "Predicting…";
      const started = performance.now();
      try {
        const result = await apiRequest("POST", `/v1/endpoints/${encodeURIComponent(endpoint.id)}/predict`, { input: inputs });
        const rows = (result.predictions || []).map((prediction, index) => {
          const row = document.createElement("tr");
          const scores = Object.entries(prediction.scores || {})
            .sort((a, b) => b[1] - a[1])
            .map(([label, score]) => `${label} ${Number(score).toFixed(3)}`)
            .join(", ");
          for (const text of [inputs[index] ?? "", prediction.label, Number(prediction.score).toFixed(4), scores]) {
            const cell = document.createElement("td");
            cell.textContent = text;
            row.append(cell);
          }
          return row;
        });
        el("predict-results").tBodies[0].replaceChildren(...rows);
        el("predict-status").textContent = `${rows.length} prediction(s) in ${formatMs(performance.now() - started)}.`;
      } catch (error) {
        el("predict-status").textContent = error.message;
      } finally {
        el("predict-submit").disabled = false;
      }
    });
  }

  // --------------------------------------------------------------------------------------------------- compare page

  function initCompare() {
    const form = el("compare-form");
    if (!form) return;
    const columns = Array.from(document.querySelectorAll(".compare-column"));
    let controller = null;

    el("compare-stop").addEventListener("click", () => controller && controller.abort());
    form.addEventListener("submit", async (submitEvent) => {
      submitEvent.preventDefault();
      const mode = checkedValue(form, "mode") || "chat";
      const text = el("compare-prompt").value;
      const params = {
        max_tokens: numberOrUndefined(el("compare-max-tokens")),
        temperature: numberOrUndefined(el("compare-temperature")),
      };
      controller = new AbortController();
      el("compare-send").disabled = true;
      el("compare-stop").disabled = false;
      // Both requests start together, so each column's TTFT and latency are measured under the same conditions.
      await Promise.all(
        columns.map(async (column) => {
          const key = column.id.replace("compare-column-", "");
          const output = el(`compare-output-${key}`);
          const stats = el(`compare-stats-${key}`);
          output.textContent = "";
          if (column.dataset.task === "classification") return;
          stats.textContent = "Waiting for the first token…";
          output.setAttribute("aria-busy", "true");
          try {
            const result = await generate({
              mode,
              model: column.dataset.endpointName,
              messages: [{ role: "user", content: text }],
              prompt: text,
              params,
              stream: true,
              signal: controller.signal,
              onDelta: (piece) => {
                output.textContent += piece;
              },
            });
            stats.textContent = describe(result);
          } catch (error) {
            stats.textContent = error.message;
          } finally {
            output.setAttribute("aria-busy", "false");
          }
        }),
      );
      controller = null;
      el("compare-send").disabled = false;
      el("compare-stop").disabled = true;
    });
  }

  return { describe, formatMs, generate, initCompare, initPlayground, initPredict };
})();

TunehousePlayground.initCompare();
