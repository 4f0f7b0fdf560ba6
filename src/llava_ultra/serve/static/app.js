// LLaVA-Ultra web page logic: a client of the server's OpenAI-compatible API, like any other.
// - Frames are read in the browser as data: URLs and sent as image_url parts with the next question.
// - The conversation (with earlier frames) is resent every turn; the API is stateless.
// - Answers stream in over SSE (fetch + ReadableStream); the last chunk's `selection` names the
//   frame the model chose, which is highlighted with its score.
// - Errors are shown exactly as the server words them (HTTP status + error.message); text from the
//   server is only ever inserted with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], frames: [], pending: [], busy: false };

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function errorText(resp) {
  const raw = await resp.text();
  try {
    const body = JSON.parse(raw);
    if (body && body.error && body.error.message) return `HTTP ${resp.status}: ${body.error.message}`;
  } catch (_) { /* not JSON: show it raw */ }
  return `HTTP ${resp.status}: ${raw || resp.statusText}`;
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: apiHeaders() });
    if (!resp.ok) { showError(await errorText(resp)); return; }
    const body = await resp.json();
    state.model = body.data[0].id;
    $("model-name").textContent = state.model;
    showError("");
  } catch (err) {
    showError(`cannot reach the server: ${err}`);
  }
}

function renderFrames(selection) {
  const box = $("frames");
  box.replaceChildren();
  const all = [...state.frames, ...state.pending];
  all.forEach((frame, i) => {
    const fig = document.createElement("figure");
    fig.className = "thumb";
    fig.dataset.index = String(i);
    const img = document.createElement("img");
    img.src = frame.url;
    img.alt = frame.name;
    const cap = document.createElement("figcaption");
    cap.textContent = `#${i + 1} ${frame.name}`;
    if (i >= state.frames.length) {
      fig.classList.add("pending");
      cap.textContent += " (next)";
    } else if (selection && selection.chosen.includes(i)) {
      fig.classList.add("chosen");
      const score = selection.scores ? ` · score ${selection.scores[i].toFixed(3)}` : "";
      cap.textContent = `#${i + 1} chosen${score}`;
    } else if (selection && selection.scores) {
      cap.textContent += ` · ${selection.scores[i].toFixed(3)}`;
    }
    fig.append(img, cap);
    box.append(fig);
  });
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, url: reader.result });
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Yields parsed SSE `data:` payloads ("[DONE]" stays a string).
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      yield data === "[DONE]" ? data : JSON.parse(data);
    }
  }
}

async function ask(question) {
  const pending = state.pending;
  const content = pending.length
    ? [...pending.map((f) => ({ type: "image_url", image_url: { url: f.url } })), { type: "text", text: question }]
    : question;
  const userMsg = { role: "user", content };
  const userDiv = addMessage("user", question + (pending.length ? `  [+${pending.length} frame(s)]` : ""));
  const answerDiv = addMessage("assistant streaming", "");
  const maxTokens = parseInt($("max-tokens").value, 10);
  const request = {
    model: state.model,
    messages: [...state.history, userMsg],
    stream: true,
    ...(Number.isFinite(maxTokens) ? { max_tokens: maxTokens } : {}),
  };
  let answer = "";
  let selection = null;
  let failed = null;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: apiHeaders(), body: JSON.stringify(request) });
    if (!resp.ok) {
      failed = await errorText(resp);
    } else {
      for await (const event of sseEvents(resp)) {
        if (event === "[DONE]") break;
        if (event.error) { failed = `stream error: ${event.error.message}`; break; }
        const delta = event.choices && event.choices[0] ? event.choices[0].delta : null;
        if (delta && delta.content) {
          answer += delta.content;
          answerDiv.textContent = answer;
          $("log").scrollTop = $("log").scrollHeight;
        }
        if (event.selection) selection = event.selection;
      }
    }
  } catch (err) {
    failed = `request failed: ${err}`;
  }
  answerDiv.classList.remove("streaming");
  if (failed) {
    showError(failed);
    userDiv.classList.add("failed");
    answerDiv.classList.add("failed");
    if (!answer) answerDiv.remove();
    return;
  }
  showError("");
  state.history.push(userMsg, { role: "assistant", content: answer });
  state.frames.push(...pending);
  state.pending = [];
  if (selection) {
    const note = document.createElement("span");
    note.className = "selection";
    const chosen = selection.chosen.map((i) => `#${i + 1}`).join(", ");
    const score = selection.scores ? ` (score ${selection.chosen.map((i) => selection.scores[i].toFixed(3)).join(", ")})` : "";
    note.textContent = `Model chose frame ${chosen} of ${selection.num_images}${score} · 模型选择的图像`;
    answerDiv.append(note);
  }
  renderFrames(selection);
}

function reset() {
  state.history = [];
  state.frames = [];
  state.pending = [];
  $("log").replaceChildren();
  showError("");
  renderFrames(null);
}

$("file-input").addEventListener("change", async (ev) => {
  const files = [...ev.target.files];
  try {
    state.pending.push(...(await Promise.all(files.map(readFile))));
  } catch (err) {
    showError(`could not read the file: ${err}`);
  }
  ev.target.value = "";
  renderFrames(null);
});

$("ask").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy) return;
  if (!state.model) await loadModel();
  if (!state.model) return;
  state.busy = true;
  $("send").disabled = true;
  $("question").value = "";
  try {
    await ask(question);
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
});

$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("ask").requestSubmit();
  }
});

$("reset").addEventListener("click", reset);
$("api-key").value = localStorage.getItem("llava-ultra-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("llava-ultra-key", $("api-key").value.trim());
  loadModel();
});
loadModel();
