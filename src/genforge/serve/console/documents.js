// The documents view (servers started with --rag): upload files into the served index with ingest
// progress, list what the index holds, and see which chunks retrieval returns for a question.

import { baseUrl, el, getJSON, keyForSnippet, ndjsonLines, postJSON, request, showStatus } from "./api.js";

export function startDocuments(features) {
  const $ = (id) => document.getElementById(id);
  const index = features.rag.index;
  $("rag-index").textContent = index;
  $("documents-snippet").textContent =
    `# index files (the server's --rag index)\ncurl -s ${baseUrl()}/rag/documents -H "Authorization: Bearer ${keyForSnippet()}" ` +
    `-F file=@notes.md\n\n# what retrieval finds for a question\ncurl -s ${baseUrl()}/rag/search ` +
    `-H "Authorization: Bearer ${keyForSnippet()}" \\\n  -H "Content-Type: application/json" ` +
    `-d '{"query": "How do I ...?", "k": ${features.rag.k}}'`;
  refreshList();

  async function refreshList() {
    try {
      const docs = await getJSON("/v1/rag/documents");
      $("document-list").replaceChildren(
        ...docs.data.map((d) => el("li", {}, el("span", { text: d.source }), el("span", { class: "muted", text: ` ${d.chunks} chunk${d.chunks === 1 ? "" : "s"}` }))),
      );
    } catch (e) {
      $("document-list").replaceChildren(el("li", { class: "muted", text: `Could not list the documents: ${e.message}` }));
    }
  }

  $("upload-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const files = $("upload-files").files;
    const note = $("ingest-note");
    const bar = $("ingest-progress");
    if (!files.length) {
      note.textContent = "Choose one or more files first.";
      return;
    }
    const form = new FormData();
    for (const f of files) form.append("file", f, f.name);
    $("upload").disabled = true;
    bar.hidden = false;
    bar.value = 0;
    note.className = "";
    note.textContent = "Uploading…";
    showStatus("");
    try {
      const response = await request("/v1/rag/documents", { method: "POST", body: form });
      let final = null;
      for await (const line of ndjsonLines(response)) {
        if (line.object === "rag.ingest.progress") {
          bar.max = Math.max(1, line.total);
          bar.value = line.done;
          note.textContent = `${line.stage} ${line.source}: ${line.done} of ${line.total}`;
        } else if (line.object === "error") {
          throw new Error(line.error.message);
        } else if (line.object === "rag.ingest") {
          final = line;
        }
      }
      if (!final) throw new Error("The server stopped before it said the documents were indexed.");
      bar.value = bar.max;
      const failed = final.failed.map((f) => `${f.source}: ${f.reason}`).join("; ");
      note.textContent = `Indexed: ${final.ingested} file(s), ${final.chunks} new chunk(s)` +
        (final.unchanged ? `, ${final.unchanged} unchanged` : "") + `; the index holds ${final.index_chunks} chunks.` +
        (failed ? ` Skipped: ${failed}` : "");
      $("upload-files").value = "";
      refreshList();
    } catch (err) {
      bar.hidden = true;
      note.className = "error";
      note.setAttribute("role", "alert");
      note.textContent = `Not indexed: ${err.message}`;
    } finally {
      $("upload").disabled = false;
    }
  });

  $("search-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const results = $("search-results");
    results.replaceChildren(el("li", { class: "muted", text: "Searching…" }));
    try {
      const found = await (await postJSON("/v1/rag/search", { query: $("search-query").value, k: features.rag.k })).json();
      results.replaceChildren(
        ...found.data.map((c) =>
          el("li", { class: "chunk" },
            el("div", { class: "chunk-head" }, el("strong", { text: c.source }),
              el("span", { class: "muted", text: ` score ${Number(c.score).toFixed(3)}` })),
            el("p", { class: "chunk-body", text: c.text })),
        ),
      );
      if (!found.data.length) results.replaceChildren(el("li", { class: "muted", text: "Nothing retrieved." }));
    } catch (err) {
      results.replaceChildren(el("li", { class: "error", role: "alert", text: err.message }));
    }
  });
  return {};
}
