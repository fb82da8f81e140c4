// The Markdown that genforge's report.md files use (headings, paragraphs, lists, pipe tables, code
// fences, inline code/bold/italic/links/images, <details> blocks, HTML comments skipped), rendered to DOM nodes.
// Own code rather than a library because the console ships no third-party script and loads nothing
// from a CDN; building nodes (never innerHTML) means report text cannot inject markup.

export function renderMarkdown(text, { image = (src) => src } = {}) {
  const out = document.createDocumentFragment();
  const lines = text.replace(/<!--[\s\S]*?-->/g, "").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const details = line.match(/^<details><summary>(.*)<\/summary>\s*$/);
    if (details) {
      // the collapsible blocks reports use (the recipe): the one HTML they contain, made a real element
      const inner = [];
      i += 1;
      while (i < lines.length && lines[i].trim() !== "</details>") inner.push(lines[i++]);
      i += 1;
      const box = document.createElement("details");
      box.append(Object.assign(document.createElement("summary"), { textContent: details[1] }));
      box.append(renderMarkdown(inner.join("\n"), { image }));
      out.append(box);
      continue;
    }
    const fence = line.match(/^```/);
    if (fence) {
      const code = [];
      i += 1;
      while (i < lines.length && !lines[i].startsWith("```")) code.push(lines[i++]);
      i += 1;
      const pre = document.createElement("pre");
      pre.append(Object.assign(document.createElement("code"), { textContent: code.join("\n") }));
      out.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      // report headings start at h3: the page's own h1/h2 come first
      const h = document.createElement(`h${Math.min(6, heading[1].length + 2)}`);
      h.append(inline(heading[2], image));
      out.append(h);
      i += 1;
      continue;
    }
    if (line.trim().startsWith("|") && i + 1 < lines.length && /^\s*\|?[\s:-]+\|[\s|:-]*$/.test(lines[i + 1])) {
      const rows = [];
      while (i < lines.length && lines[i].trim().startsWith("|")) rows.push(lines[i++]);
      out.append(table(rows, image));
      continue;
    }
    const item = line.match(/^\s*([-*]|\d+\.)\s+(.*)$/);
    if (item) {
      const list = document.createElement(/\d/.test(item[1]) ? "ol" : "ul");
      while (i < lines.length) {
        const m = lines[i].match(/^\s*([-*]|\d+\.)\s+(.*)$/);
        if (!m) break;
        const li = document.createElement("li");
        li.append(inline(m[2], image));
        list.append(li);
        i += 1;
      }
      out.append(list);
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^(#{1,6}\s|```|\s*\|)/.test(lines[i])) para.push(lines[i++]);
    if (!para.length) para.push(lines[i++]);
    const p = document.createElement("p");
    p.append(inline(para.join("\n"), image));
    out.append(p);
  }
  return out;
}

function cells(row) {
  return row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function table(rows, image) {
  const t = document.createElement("table");
  const head = t.createTHead().insertRow();
  for (const c of cells(rows[0])) {
    const th = document.createElement("th");
    th.scope = "col";
    th.append(inline(c, image));
    head.append(th);
  }
  const body = t.createTBody();
  for (const row of rows.slice(2)) {
    const tr = body.insertRow();
    for (const c of cells(row)) tr.insertCell().append(inline(c, image));
  }
  const wrap = document.createElement("div");
  wrap.className = "table-wrap";
  wrap.append(t);
  return wrap;
}

const INLINE = /(!\[([^\]]*)\]\(([^)\s]+)\))|(\[([^\]]+)\]\(([^)\s]+)\))|(`([^`]+)`)|(\*\*([^*]+)\*\*)|(\*([^*\s][^*]*)\*)|( {2}\n)/g;

function inline(text, image) {
  const frag = document.createDocumentFragment();
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) frag.append(text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[1]) {
      const img = document.createElement("img");
      img.alt = m[2];
      Promise.resolve(image(m[3])).then((src) => (img.src = src));
      frag.append(img);
    } else if (m[4]) {
      const a = document.createElement("a");
      a.textContent = m[5];
      if (/^https?:/.test(m[6])) {
        a.href = m[6];
        a.rel = "noopener";
      }
      frag.append(a);
    } else if (m[7]) {
      frag.append(Object.assign(document.createElement("code"), { textContent: m[8] }));
    } else if (m[9]) {
      frag.append(Object.assign(document.createElement("strong"), { textContent: m[10] }));
    } else if (m[11]) {
      frag.append(Object.assign(document.createElement("em"), { textContent: m[12] }));
    } else {
      frag.append(document.createElement("br"));
    }
  }
  if (last < text.length) frag.append(text.slice(last));
  return frag;
}
