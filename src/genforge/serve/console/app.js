// Boot: ask the server what it offers (/v1/features), show only those views, wire the tabs, the key
// dialog and the copy buttons. Each view lives in its own module and starts on first open.

import { ApiError, apiKey, getJSON, onKeyNeeded, setApiKey, showStatus } from "./api.js";
import { startChat } from "./chat.js";
import { startDocuments } from "./documents.js";
import { startImages } from "./images.js";
import { startRuns } from "./runs.js";

const VIEWS = {
  chat: { start: startChat, offered: (f) => f.chat },
  images: { start: startImages, offered: (f) => Boolean(f.images) },
  documents: { start: startDocuments, offered: (f) => f.documents },
  runs: { start: startRuns, offered: () => true },
};
const started = new Map();
let features = null;

let pendingKey = null; // several requests refused at once share one dialog

function askKey(why) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-why").textContent = why;
  input.value = "";
  dialog.returnValue = "";
  pendingKey = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const key = dialog.returnValue === "ok" ? input.value.trim() : "";
        if (key) setApiKey(key);
        pendingKey = null;
        resolve(Boolean(key));
      },
      { once: true },
    );
    dialog.showModal();
    input.focus();
  });
  return pendingKey;
}

function show(name, { focus = false } = {}) {
  if (!VIEWS[name] || !VIEWS[name].offered(features)) return;
  for (const view of Object.keys(VIEWS)) {
    const tab = document.getElementById(`tab-${view}`);
    const panel = document.getElementById(`view-${view}`);
    const on = view === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    panel.hidden = !on;
    const instance = started.get(view);
    if (instance && instance.visible) instance.visible(on);
  }
  if (!started.has(name)) started.set(name, VIEWS[name].start(features) || {});
  const instance = started.get(name);
  if (instance.visible) instance.visible(true);
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (focus) document.getElementById(`tab-${name}`).focus();
}

function wireTabs() {
  const tabs = [...document.querySelectorAll("#tabs [role=tab]")].filter((t) => !t.hidden);
  for (const tab of tabs) {
    tab.addEventListener("click", () => show(tab.dataset.view));
    // WAI-ARIA tabs: arrows move between tabs, Home/End to the ends
    tab.addEventListener("keydown", (e) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      show(tabs[(next + tabs.length) % tabs.length].dataset.view, { focus: true });
    });
  }
}

function wireCopyButtons() {
  document.addEventListener("click", async (e) => {
    const button = e.target.closest("button.copy");
    if (!button) return;
    const text = document.getElementById(button.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      // no clipboard permission (plain http on another host): select the text for Ctrl+C instead
      const range = document.createRange();
      range.selectNodeContents(document.getElementById(button.dataset.copy));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
    setTimeout(() => (button.textContent = "Copy"), 2000);
  });
}

async function loadFeatures() {
  for (;;) {
    try {
      return await getJSON("/v1/features");
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        showStatus("The console needs the server's API key to go on.", "error");
        await askKey(apiKey() ? "The server refused this API key. Enter it again." : "This server needs an API key.");
        continue;
      }
      throw e;
    }
  }
}

async function boot() {
  onKeyNeeded(askKey);
  document.getElementById("key-button").addEventListener("click", async () => {
    if (await askKey("Enter the API key to use from now on.")) location.reload();
  });
  wireCopyButtons();
  try {
    features = await loadFeatures();
  } catch (e) {
    document.getElementById("loading").textContent = `The console could not start: ${e.message}`;
    return;
  }
  showStatus("");
  document.getElementById("loading").hidden = true;
  document.getElementById("model-name").textContent = features.model;
  document.title = `genforge · ${features.model}`;
  for (const [name, view] of Object.entries(VIEWS)) {
    document.getElementById(`tab-${name}`).hidden = !view.offered(features);
  }
  wireTabs();
  const wanted = location.hash.slice(1);
  const first = Object.keys(VIEWS).find((v) => VIEWS[v].offered(features));
  show(VIEWS[wanted] && VIEWS[wanted].offered(features) ? wanted : first);
}

boot();
