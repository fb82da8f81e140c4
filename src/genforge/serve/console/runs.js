// The runs & metrics view: live serving figures read from /metrics every 2 s (throughput, time to
// first token, queue depth, cache hit rate) with a short history, and the served run's report.md
// (loss curves, samples, evaluation tables), its images fetched with the API key.

import { baseUrl, el, getJSON, keyForSnippet, relative, request, serverUrl } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const POLL_MS = 2000;
const HISTORY = 60; // points in each sparkline: two minutes

export function startRuns(features) {
  const $ = (id) => document.getElementById(id);
  $("runs-snippet").textContent =
    `# the serving metrics (Prometheus text; no key needed)\ncurl -s ${serverUrl()}/metrics | grep '^genforge:'\n\n` +
    `# the served run's report\ncurl -s ${baseUrl()}/run/report -H "Authorization: Bearer ${keyForSnippet()}"`;
  if (features.report) loadReport($("report"));
  const history = { throughput: [], ttft: [] };
  let previous = null;
  let timer = null;

  async function poll() {
    let text;
    try {
      const response = await fetch(relative("/metrics"));
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      text = await response.text();
    } catch (e) {
      $("metrics-updated").textContent = `the server did not answer (${e.message})`;
      return;
    }
    const now = { at: performance.now(), m: parsePrometheus(text) };
    const figures = summarize(now, previous);
    previous = now;
    push(history.throughput, figures.throughput);
    push(history.ttft, figures.ttftWindow);
    renderFigures($("live-metrics"), figures, history);
    $("metrics-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  return {
    visible(on) {
      if (on && !timer) {
        poll();
        timer = setInterval(poll, POLL_MS);
      } else if (!on && timer) {
        clearInterval(timer);
        timer = null;
      }
    },
  };
}

// {name: [{labels, value}]} from Prometheus' text format.
export function parsePrometheus(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    (out[m[1]] ||= []).push({ labels, value: Number(m[4]) });
  }
  return out;
}

function total(m, name, where = () => true) {
  return (m[name] || []).filter((s) => where(s.labels)).reduce((a, s) => a + s.value, 0);
}

function summarize(now, before) {
  const m = now.m;
  const tokens = total(m, "genforge:generation_tokens_total");
  const ttftSum = total(m, "genforge:time_to_first_token_seconds_sum");
  const ttftCount = total(m, "genforge:time_to_first_token_seconds_count");
  const hits = total(m, "genforge:cache_lookups_total", (l) => l.result === "hit");
  const lookups = total(m, "genforge:cache_lookups_total", (l) => ["hit", "miss"].includes(l.result));
  const f = {
    running: total(m, "genforge:num_requests_running"),
    waiting: total(m, "genforge:num_requests_waiting"),
    served: total(m, "genforge:request_success_total"),
    errors: total(m, "genforge:request_errors_total"),
    tokens,
    ttftMean: ttftCount ? ttftSum / ttftCount : null,
    cacheHitRate: lookups ? hits / lookups : null,
    throughput: null,
    ttftWindow: null,
  };
  if (before) {
    const dt = (now.at - before.at) / 1000;
    const b = before.m;
    f.throughput = dt > 0 ? (tokens - total(b, "genforge:generation_tokens_total")) / dt : null;
    const dn = ttftCount - total(b, "genforge:time_to_first_token_seconds_count");
    f.ttftWindow = dn > 0 ? (ttftSum - total(b, "genforge:time_to_first_token_seconds_sum")) / dn : null;
  }
  return f;
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

const fmt = {
  rate: (v) => (v === null ? "–" : `${v.toFixed(1)} tok/s`),
  ms: (v) => (v === null ? "–" : `${(v * 1000).toFixed(0)} ms`),
  pct: (v) => (v === null ? "no lookups yet" : `${(v * 100).toFixed(0)} %`),
  n: (v) => String(Math.round(v)),
};

function renderFigures(dl, f, history) {
  const rows = [
    ["Throughput (last 2 s)", fmt.rate(f.throughput), "metric-throughput", history.throughput],
    ["Time to first token (last 2 s)", fmt.ms(f.ttftWindow), "metric-ttft-window", history.ttft],
    ["Time to first token (mean)", fmt.ms(f.ttftMean), "metric-ttft"],
    ["Requests running", fmt.n(f.running), "metric-running"],
    ["Queue depth", fmt.n(f.waiting), "metric-waiting"],
    ["Cache hit rate", fmt.pct(f.cacheHitRate), "metric-cache"],
    ["Requests served", fmt.n(f.served), "metric-served"],
    ["Tokens generated", fmt.n(f.tokens), "metric-tokens"],
    ["Errors", fmt.n(f.errors), "metric-errors"],
  ];
  dl.replaceChildren(
    ...rows.map(([label, value, id, series]) =>
      el("div", { class: "metric" }, el("dt", { text: label }), el("dd", { id, text: value }),
        series ? sparkline(series, label) : null),
    ),
  );
}

function sparkline(series, label) {
  const values = series.map((v) => v ?? 0);
  const max = Math.max(...values, 1e-9);
  const w = 120;
  const h = 28;
  const step = values.length > 1 ? w / (HISTORY - 1) : 0;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(h - (v / max) * (h - 2) - 1).toFixed(1)}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${label}, last ${values.length} readings`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  svg.append(line);
  return svg;
}

async function loadReport(article) {
  try {
    const report = await getJSON("/v1/run/report");
    const image = async (src) => {
      if (/^(https?:|data:)/.test(src)) return src;
      const response = await request(`/v1/run/files/${src.split("/").map(encodeURIComponent).join("/")}`);
      return URL.createObjectURL(await response.blob());
    };
    article.replaceChildren(renderMarkdown(report.markdown, { image }));
  } catch (e) {
    article.replaceChildren(el("p", { class: "error", text: `Could not load the report: ${e.message}` }));
  }
}
