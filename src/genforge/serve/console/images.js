// The images view: a class (class-conditional runs) or a prompt (text-to-image runs), guidance,
// steps, seed and count; a grid of results with download links; image-to-image and inpainting with a
// drawn mask where the run supports edits (text-to-image: POST /v1/images/edits).

import { baseUrl, el, keyForSnippet, postJSON, request, showStatus } from "./api.js";

export function startImages(features) {
  const $ = (id) => document.getElementById(id);
  const info = features.images;
  const text = info.kind === "text";
  $("image-prompt-row").hidden = !text;
  $("image-class-row").hidden = text || !info.classes.length;
  $("image-guidance-row").hidden = !info.guidance;
  $("image-steps-row").hidden = !info.steps;
  $("image-edit").hidden = !info.edits;
  $("image-n").max = String(info.max_n || 64);
  if (info.max_steps) $("image-steps").max = String(info.max_steps);
  $("image-class").replaceChildren(...info.classes.map((c) => el("option", { value: c, text: c })));
  $("edit-strength").addEventListener("input", () => ($("edit-strength-out").textContent = $("edit-strength").value));
  const mask = info.edits ? maskPainter($("mask-canvas"), $("clear-mask")) : null;
  if (info.edits) {
    // the uploaded image shows under the canvas, so the mask is painted where it is meant
    $("edit-image").addEventListener("change", () => {
      const file = $("edit-image").files[0];
      $("mask-canvas").style.backgroundImage = file ? `url(${URL.createObjectURL(file)})` : "";
    });
  }

  function body() {
    const b = { model: features.model, n: Number($("image-n").value) || 1, size: `${info.size}x${info.size}`,
      response_format: "b64_json" };
    if (text) b.prompt = $("image-prompt").value;
    else if (info.classes.length) b.class = $("image-class").value;
    const seed = $("image-seed").value.trim();
    if (seed !== "") b.seed = Number(seed);
    if (info.guidance) b[text ? "guidance_scale" : "guidance"] = Number($("image-guidance").value);
    if (info.steps) b[text ? "num_inference_steps" : "steps"] = Number($("image-steps").value);
    return b;
  }

  function updateSnippet() {
    const b = body();
    const editing = info.edits && $("edit-image").files.length;
    if (editing) {
      const fields = Object.entries(b).filter(([k]) => k !== "model").map(([k, v]) => `-F ${k}=${JSON.stringify(String(v))}`);
      $("image-snippet").textContent =
        `curl -s ${baseUrl()}/images/edits -H "Authorization: Bearer ${keyForSnippet()}" \\\n` +
        `  -F image=@input.png -F mask=@mask.png ${fields.join(" ")} -F strength=${$("edit-strength").value}`;
      return;
    }
    const extra = Object.entries(b).filter(([k]) => !["model", "prompt", "n", "size", "response_format"].includes(k));
    $("image-snippet").textContent =
      `curl -s ${baseUrl()}/images/generations -H "Authorization: Bearer ${keyForSnippet()}" \\\n` +
      `  -H "Content-Type: application/json" -d '${JSON.stringify(b)}'\n\n` +
      `# Python (pip install openai): genforge's own fields go in extra_body\nfrom openai import OpenAI\n` +
      `client = OpenAI(base_url="${baseUrl()}", api_key="${keyForSnippet()}")\n` +
      `result = client.images.generate(model=${JSON.stringify(b.model)}, prompt=${JSON.stringify(b.prompt || "")}, ` +
      `n=${b.n}, size=${JSON.stringify(b.size)},\n    response_format="b64_json", extra_body=${JSON.stringify(Object.fromEntries(extra))})`;
  }
  $("image-form").addEventListener("input", updateSnippet);
  updateSnippet();

  $("image-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const button = $("generate");
    button.disabled = true;
    $("image-note").textContent = "Generating…";
    showStatus("");
    const started = performance.now();
    try {
      let response;
      const file = info.edits ? $("edit-image").files[0] : null;
      if (file) {
        const form = new FormData();
        for (const [k, v] of Object.entries(body())) if (k !== "model") form.append(k, String(v));
        form.append("strength", $("edit-strength").value);
        form.append("image", file);
        if (mask.painted()) form.append("mask", await mask.blob(await createImageBitmap(file)), "mask.png");
        response = await request("/v1/images/edits", { method: "POST", body: form });
      } else {
        response = await postJSON("/v1/images/generations", body());
      }
      const result = await response.json();
      showGrid(result.data);
      $("image-note").textContent = `${result.data.length} image(s) in ${((performance.now() - started) / 1000).toFixed(1)} s`;
    } catch (err) {
      $("image-note").textContent = "";
      showStatus(`The server refused: ${err.message}`, "error");
    } finally {
      button.disabled = false;
    }
  });

  function showGrid(data) {
    const grid = $("image-grid");
    const label = text ? $("image-prompt").value : $("image-class").value || "sample";
    grid.replaceChildren(
      ...data.map((d, i) => {
        const src = `data:image/png;base64,${d.b64_json}`;
        const name = `${features.model}-${label.replace(/[^\w-]+/g, "_").slice(0, 40) || "image"}-${i + 1}.png`;
        return el("li", {},
          el("img", { src, alt: `Generated image ${i + 1}${label ? ` of ${label}` : ""}`, width: 128, height: 128 }),
          el("a", { href: src, download: name, text: "Download" }));
      }),
    );
  }
  return {};
}

// A canvas over the uploaded image where the user paints the inpainting mask (mouse, pen or touch;
// arrow keys + Shift or space for the keyboard). Strokes are white on transparent; the PNG sent is
// white on black at the image's own size, as the edits endpoint wants it.
function maskPainter(canvas, clearButton) {
  const ctx = canvas.getContext("2d");
  let painting = false;
  let painted = false;
  let cursor = { x: canvas.width / 2, y: canvas.height / 2 };
  const clear = () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    painted = false;
  };
  const dab = (x, y) => {
    ctx.fillStyle = "white";
    ctx.beginPath();
    ctx.arc(x, y, canvas.width / 12, 0, Math.PI * 2);
    ctx.fill();
    painted = true;
  };
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return { x: ((e.clientX - r.left) * canvas.width) / r.width, y: ((e.clientY - r.top) * canvas.height) / r.height };
  };
  clear();
  canvas.addEventListener("pointerdown", (e) => {
    painting = true;
    canvas.setPointerCapture(e.pointerId);
    const p = at(e);
    dab(p.x, p.y);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!painting) return;
    const p = at(e);
    dab(p.x, p.y);
  });
  canvas.addEventListener("pointerup", () => (painting = false));
  canvas.addEventListener("keydown", (e) => {
    const step = canvas.width / 16;
    const move = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] }[e.key];
    if (move) {
      e.preventDefault();
      cursor = { x: Math.min(canvas.width, Math.max(0, cursor.x + move[0])), y: Math.min(canvas.height, Math.max(0, cursor.y + move[1])) };
      if (e.shiftKey) dab(cursor.x, cursor.y);
    } else if (e.key === " ") {
      e.preventDefault();
      dab(cursor.x, cursor.y);
    }
  });
  clearButton.addEventListener("click", clear);
  return {
    painted: () => painted,
    blob: (size) => {
      const out = document.createElement("canvas");
      out.width = size.width;
      out.height = size.height;
      const o = out.getContext("2d");
      o.fillStyle = "black";
      o.fillRect(0, 0, out.width, out.height);
      o.drawImage(canvas, 0, 0, out.width, out.height);
      return new Promise((resolve) => out.toBlob(resolve, "image/png"));
    },
  };
}
