// The chat view: streamed answers, sampling controls, model/adapter picker, stop and regenerate,
// the conversation kept in this browser (localStorage), and markers for what the server did with a
// turn: answered from the semantic cache, grounded in documents, redacted or blocked by the guard,
// watermarked.

import {
  ApiError,
  baseUrl,
  el,
  getJSON,
  keyForSnippet,
  postJSON,
  sseEvents,
  showStatus,
} from "./api.js";

const HISTORY_STORE = "genforge.chat.history";
// The output guard's placeholders ([EMAIL_1], [FILTERED]): text the server replaced while streaming.
const PLACEHOLDER = /\[(?:[A-Z_]+_\d+|FILTERED)\]/;

export function startChat(features) {
  const $ = (id) => document.getElementById(id);
  const list = $("messages");
  const input = $("chat-input");
  const state = { history: loadHistory(), controller: null, lastBody: null };

  if (!features.cache) $("use-cache").closest("label").hidden = true;
  const badges = $("chat-badges");
  if (features.watermark) badges.append(el("span", { class: "badge", text: "Watermarked deployment" }));
  if (features.guard) badges.append(el("span", { class: "badge", text: `Guard: ${features.guard}` }));
  if (features.rag) badges.append(el("span", { class: "badge", text: `RAG: ${features.rag.index}` }));
  if (features.cache) badges.append(el("span", { class: "badge", text: "Semantic cache on" }));

  for (const [id, out] of [["temperature", "temperature-out"], ["top-p", "top-p-out"]]) {
    $(id).addEventListener("input", () => ($(out).textContent = $(id).value));
  }
  fillModels($("chat-model"), features);
  for (const turn of state.history) list.append(renderTurn(turn));
  updateButtons();
  updateSnippet(requestBody(features, [{ role: "user", content: "Hello!" }], $));

  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || state.controller) return;
    input.value = "";
    const turn = { role: "user", content: text };
    state.history.push(turn);
    list.append(renderTurn(turn));
    answer();
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("regenerate").addEventListener("click", () => {
    if (state.controller) return;
    if (state.history.length && state.history.at(-1).role === "assistant") {
      state.history.pop();
      list.lastElementChild.remove();
    }
    answer();
  });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    list.replaceChildren();
    saveHistory(state.history);
    updateButtons();
    input.focus();
  });

  async function answer() {
    const messages = state.history.filter((t) => !t.failed).map((t) => ({ role: t.role, content: t.content }));
    const body = requestBody(features, messages, $);
    state.lastBody = body;
    updateSnippet(body);
    const turn = { role: "assistant", content: "", markers: {} };
    const node = renderTurn(turn, { streaming: true });
    list.append(node);
    state.controller = new AbortController();
    updateButtons();
    showStatus("");
    try {
      const response = await postJSON("/v1/chat/completions", body, { signal: state.controller.signal });
      turn.markers = markersOf(response.headers);
      for await (const chunk of sseEvents(response)) {
        if (chunk.sources) turn.markers.sources = chunk.sources;
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          turn.content += choice.delta.content;
          node.dataset.chunks = String(Number(node.dataset.chunks || 0) + 1);
          setText(node, turn.content);
        }
        if (choice && choice.finish_reason) turn.markers.finish = choice.finish_reason;
      }
      if (PLACEHOLDER.test(turn.content)) turn.markers.outputFiltered = true;
      turn.markers.empty = !turn.content;
    } catch (e) {
      if (e.name === "AbortError") {
        turn.markers.stopped = true;
      } else if (e instanceof ApiError && e.code === "content_filtered") {
        turn.markers.blocked = e.message;
        turn.failed = true;
      } else {
        turn.markers.error = e.message;
        turn.markers.retry = e.status === 0 || e.status >= 500;
        turn.failed = true;
      }
    } finally {
      state.controller = null;
    }
    state.history.push(turn);
    node.replaceWith(renderTurn(turn));
    saveHistory(state.history);
    updateButtons();
  }

  function updateButtons() {
    const busy = Boolean(state.controller);
    $("send").disabled = busy;
    $("stop").hidden = !busy;
    $("regenerate").hidden = busy || !state.history.length;
  }

  function renderTurn(turn, { streaming = false } = {}) {
    const who = turn.role === "user" ? "You" : "Assistant";
    const node = el(
      "li",
      { class: `message ${turn.role}${streaming ? " streaming" : ""}`, "aria-busy": streaming ? "true" : null },
      el("span", { class: "who", text: who }),
      el("div", { class: "text", text: turn.content }),
    );
    if (turn.role === "assistant" && !streaming) node.append(renderMarkers(turn.markers || {}));
    return node;
  }

  function renderMarkers(m) {
    const box = el("div", { class: "markers" });
    if (m.cache === "hit") {
      const sim = m.similarity ? ` (similarity ${Number(m.similarity).toFixed(2)})` : "";
      box.append(el("span", { class: "marker cache", text: `From the semantic cache${sim}` }));
    }
    if (m.guard) {
      const why = m.guardReason ? `: ${m.guardReason}` : "";
      box.append(el("span", { class: "marker guard", text: `Input ${m.guard} by the guard${why}` }));
    }
    if (m.outputFiltered) {
      box.append(el("span", { class: "marker guard", text: "Parts of the answer were redacted by the guard" }));
    }
    if (m.blocked) {
      // the server's message says why ("... blocked by the guard: prompt injection ..."): shown as it is
      const why = /guard/i.test(m.blocked) ? m.blocked : `Blocked by the guard: ${m.blocked}`;
      box.append(el("span", { class: "marker blocked", role: "alert", text: why.charAt(0).toUpperCase() + why.slice(1) }));
    }
    if (m.watermark) box.append(el("span", { class: "marker watermark", text: "Watermarked" }));
    if (m.finish === "stop" && m.empty) box.append(el("span", { class: "marker", text: "The model ended its answer at once" }));
    if (m.finish === "length") box.append(el("span", { class: "marker", text: "Stopped at max tokens" }));
    if (m.stopped) box.append(el("span", { class: "marker", text: "Stopped" }));
    if (m.sources && m.sources.length) {
      const sources = el("ol", { class: "sources", "aria-label": "Sources" });
      m.sources.forEach((s, i) => {
        sources.append(
          el("li", {}, el("button", {
            type: "button",
            class: "source",
            title: `${s.source} (score ${Number(s.score || 0).toFixed(2)})`,
            text: `[${i + 1}] ${s.source}`,
            onclick: () => openChunk(s),
          })),
        );
      });
      box.append(el("span", { class: "marker rag", text: `Grounded in ${m.sources.length} source(s)` }), sources);
    }
    if (m.error) {
      box.append(el("span", { class: "marker blocked", role: "alert", text: m.error }));
      if (m.retry) {
        box.append(el("button", { type: "button", class: "retry", text: "Retry", onclick: () => retry() }));
      }
    }
    return box;
  }

  function retry() {
    if (state.controller) return;
    if (state.history.length && state.history.at(-1).role === "assistant") {
      state.history.pop();
      list.lastElementChild.remove();
    }
    answer();
  }

  function updateSnippet(body) {
    const json = JSON.stringify({ ...body, stream: false }, null, 2);
    const py = Object.entries({ ...body, stream: undefined, cache: undefined })
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `    ${k}=${JSON.stringify(v).replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False")},`)
      .join("\n");
    $("chat-snippet").textContent =
      `curl -s ${baseUrl()}/chat/completions \\\n  -H "Authorization: Bearer ${keyForSnippet()}" ` +
      `-H "Content-Type: application/json" \\\n  -d '${json.replace(/'/g, "'\\''")}'\n\n` +
      `# Python (pip install openai)\nfrom openai import OpenAI\n` +
      `client = OpenAI(base_url="${baseUrl()}", api_key="${keyForSnippet()}")\n` +
      `reply = client.chat.completions.create(\n${py}\n)\nprint(reply.choices[0].message.content)`;
  }

  return {};
}

function requestBody(features, messages, $) {
  const body = {
    model: $("chat-model").value || features.model,
    messages,
    stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value) || 64,
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  if (features.cache && !$("use-cache").checked) body.cache = false;
  return body;
}

async function fillModels(select, features) {
  let ids = [features.model, ...(features.adapters || [])];
  try {
    const models = await getJSON("/v1/models");
    ids = models.data.map((m) => m.id);
  } catch (e) {
    showStatus(`Could not list the models: ${e.message}`, "error");
  }
  select.replaceChildren(...ids.map((id) => el("option", { value: id, text: id })));
}

function markersOf(headers) {
  return {
    cache: headers.get("x-genforge-cache"),
    similarity: headers.get("x-genforge-cache-similarity"),
    guard: headers.get("x-genforge-guard"),
    guardReason: headers.get("x-genforge-guard-reason"),
    watermark: headers.get("x-genforge-watermark"),
  };
}

function setText(node, text) {
  node.querySelector(".text").textContent = text;
}

async function openChunk(source) {
  const dialog = document.getElementById("chunk-dialog");
  document.getElementById("chunk-title").textContent = source.source;
  const text = document.getElementById("chunk-text");
  text.textContent = source.text || "Loading…";
  dialog.showModal();
  if (source.text) return;
  try {
    const chunk = await getJSON(`/v1/rag/chunks/${encodeURIComponent(source.id)}`);
    text.textContent = chunk.text;
  } catch (e) {
    text.textContent = `Could not open this source: ${e.message}`;
  }
}

function loadHistory() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]");
  } catch {
    return [];
  }
}

function saveHistory(history) {
  localStorage.setItem(HISTORY_STORE, JSON.stringify(history.slice(-200)));
}
