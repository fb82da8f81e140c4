"""`genforge eval RUN` for text-to-image (latent-diffusion) runs: does the image say what the text asked?

Rows, all scored with the dataset's domain classifier (jobs/image_eval.py trains it once per dataset):
* held-out prompts: every class written with every held-out phrasing template (data/captions.py:
  English and Chinese templates no training caption used), each asking for a seeded random subset
  of the measurable attributes (thickness, slant, size). Prompt-class accuracy is the share of
  images the classifier assigns to the class the prompt named, per language and per template;
  attribute agreement is the share of images whose measured level (data/attributes.py, binned with
  the dataset's per-class edges) is the level the prompt asked for (chance is 1/3);
* class prompts (FID/KID): one image per held-out real image, prompted with its class in a training
  phrasing, against the same features of the training images, beside the real-vs-real floor, as
  the class-conditional families are scored;
* inpainting: the centre of held-out images masked and regenerated, prompted with the image's own
  class and with another class: the unmasked pixels' largest change (zero: they are copied back),
  the VAE round trip they would have suffered otherwise, and the classifier's accuracy on the
  prompted class.
Writes RUN/eval/text_image_metrics.json, sample grids and a section of report.md.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from genforge.common.errors import ConfigError
from genforge.common.progress import progress_bar
from genforge.common.runs import RunDir, atomic_write_text, update_report
from genforge.data.attributes import attribute_bins, measure_attributes
from genforge.data.captions import (
    ATTRIBUTE_LEVELS,
    HELDOUT_TEMPLATES,
    caption_for,
    is_chinese,
)
from genforge.data.images import save_image_grid
from genforge.jobs.image_eval import _score, ensure_classifier, run_dataset
from genforge.models.classifier import embed
from genforge.models.latent_diffusion import load_text_to_image
from genforge.models.text_to_image import inpaint, text_to_image, vae_round_trip_error

CLASS_TEMPLATE = "a handwritten {word}"  # a training phrasing, for the FID row (the class alone)
FID_GUIDANCES = (1.5, 1.0)  # FID rows beside the main one: 1.5 is the class-conditional eval's default


def heldout_prompts(classes: list[str], seed: int = 0) -> list[dict]:
    """Every class in every held-out template, each asking for 0-3 attributes at seeded levels."""
    rs = random.Random(seed)
    prompts = []
    for c in classes:
        for t, template in enumerate(HELDOUT_TEMPLATES):
            names = sorted(rs.sample(list(ATTRIBUTE_LEVELS), rs.randint(0, len(ATTRIBUTE_LEVELS))))
            attrs = {a: rs.choice(ATTRIBUTE_LEVELS[a]) for a in names}
            prompts.append({"prompt": caption_for(c, attrs, template, variant=rs.randrange(3)), "class": c,
                            "attributes": attrs, "template": t, "language": "zh" if is_chinese(template) else "en"})
    return prompts


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 N x C x H x W -> float in [-1, 1], as the classifier and the datasets hold images."""
    return torch.from_numpy(images).float().div(127.5).sub(1.0)


def _predict(clf, images: np.ndarray) -> np.ndarray:
    _, logits = embed(clf, _to_unit(images))
    return logits.argmax(-1).numpy()


def centre_mask(size: int, fraction: float = 0.5) -> np.ndarray:
    """A square mask over the centre covering `fraction` of the side (a quarter of the area at 0.5)."""
    side = max(1, round(size * fraction))
    start = (size - side) // 2
    mask = np.zeros((size, size), bool)
    mask[start:start + side, start:start + side] = True
    return mask


def evaluate_text_image_run(run: str | Path, *, samples_per_prompt: int = 4, guidance: float = 4.0,
                            steps: int = 25, num_fid: int = 300, inpaint_images: int = 40, seed: int = 0,
                            classifier_steps: int | None = None) -> dict:
    """Score a latent-diffusion run (see the module doc); returns the flat summary the CLI prints."""
    if samples_per_prompt < 1 or num_fid < 2 or inpaint_images < 1:
        raise ConfigError("text-to-image eval needs at least 1 sample per prompt, 2 images for FID and 1 to inpaint")
    run_dir = RunDir.open(run)
    pipe = load_text_to_image(run_dir.path)
    ds, exclude = run_dataset(run_dir)
    edges = ds.stats.get("caption_attribute_edges")
    if edges is None:
        raise ConfigError(f"{ds.path} has no caption attribute edges (stats.json caption_attribute_edges); prepare "
                          "it with `genforge data prepare builtin:digits-captions`, or a captioned folder")
    clf = ensure_classifier(run_dir, ds, classifier_steps)
    classes = [ds.classes[i] for i in range(ds.num_classes) if i not in exclude]
    out: dict = {"run": str(run_dir.path), "guidance": guidance, "steps": steps, "seed": seed,
                 "samples_per_prompt": samples_per_prompt}
    grids: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings(), progress_bar() as bar:
        warnings.simplefilter("ignore")  # the unknown-token warning, once per Chinese prompt: counted below
        out["heldout"], grids["held-out prompts"] = _heldout_rows(pipe, clf, classes, ds.classes, edges, bar,
                                                                   samples_per_prompt, guidance, steps, seed)
        out["class_prompts"], grids["class prompts"] = _fid_rows(pipe, clf, ds, exclude, bar, num_fid, guidance,
                                                                 steps, seed)
        out["inpainting"], grids["inpainting"] = _inpaint_rows(pipe, clf, ds, exclude, bar, inpaint_images,
                                                               guidance, steps, seed)
    tok = pipe.tokenizer
    out["unknown_token_share"] = {
        lang: float(np.mean([np.mean(np.asarray(tok(p["prompt"])["input_ids"]) == tok.unk_token_id)
                             for p in heldout_prompts(classes, seed) if p["language"] == lang]))
        for lang in ("en", "zh")}
    summary = _summary(out)
    out["summary"] = summary
    (run_dir.path / "eval").mkdir(exist_ok=True)
    atomic_write_text(run_dir.path / "eval" / "text_image_metrics.json", json.dumps(out, indent=2, ensure_ascii=False))
    paths = {}
    for i, (name, images) in enumerate(grids.items()):
        paths[name] = save_image_grid(images, run_dir.path / "plots" / f"eval-t2i-{i}.png", nrow=8, scale=3)
    update_report(run_dir, "text-image evaluation", _section(out, paths, run_dir.path))
    return summary


def _heldout_rows(pipe, clf, classes, names, edges, bar, n, guidance, steps, seed) -> tuple[dict, torch.Tensor]:
    prompts = heldout_prompts(classes, seed)
    task = bar.add_task("held-out prompts", total=len(prompts), info=f"{n} images each")
    records, shown = [], []
    t0 = time.perf_counter()
    for k, p in enumerate(prompts):
        images = text_to_image(pipe, p["prompt"], num_samples=n, guidance=guidance, steps=steps, seed=seed + k)
        pred = _predict(clf, images)
        levels = attribute_bins(measure_attributes(images), edges, [p["class"]] * n)
        for j in range(n):
            records.append({"prompt": p["prompt"], "class": p["class"], "language": p["language"],
                            "template": p["template"], "predicted": names[pred[j]], "asked": p["attributes"],
                            "measured": {a: levels[a][j] for a in levels}})
        if p["language"] == "en" and p["template"] == 0 or p["language"] == "zh" and p["template"] == 4:
            shown.append(_to_unit(images[:4]))
        bar.update(task, advance=1)
    seconds = time.perf_counter() - t0

    def acc(rows: list[dict]) -> float | None:
        return sum(r["predicted"] == r["class"] for r in rows) / len(rows) if rows else None

    result: dict = {"prompts": len(prompts), "images": len(records), "seconds": seconds,
                    "images_per_s": len(records) / seconds, "class_accuracy": acc(records),
                    "by_language": {lang: acc([r for r in records if r["language"] == lang]) for lang in ("en", "zh")},
                    "by_template": {HELDOUT_TEMPLATES[t]: acc([r for r in records if r["template"] == t])
                                    for t in range(len(HELDOUT_TEMPLATES))},
                    "by_class": {c: acc([r for r in records if r["class"] == c]) for c in classes},
                    "attributes": {}}
    for a in ATTRIBUTE_LEVELS:
        asked = [r for r in records if a in r["asked"]]
        result["attributes"][a] = {
            "images": len(asked),
            "agreement": sum(r["measured"][a] == r["asked"][a] for r in asked) / len(asked) if asked else None,
            "by_language": {lang: (sum(r["measured"][a] == r["asked"][a] for r in rows) / len(rows) if rows else None)
                            for lang in ("en", "zh") for rows in [[r for r in asked if r["language"] == lang]]}}
    result["records"] = records
    return result, torch.cat(shown)[:64]


def _fid_rows(pipe, clf, ds, exclude, bar, num_fid, guidance, steps, seed) -> tuple[dict, torch.Tensor]:
    """FID/KID of class prompts at `guidance` ("model") and at each of FID_GUIDANCES ("rows"; guidance
    trades diversity, which FID counts, for purity), against the real-vs-real floor."""
    train_x, train_y = ds.split("train", exclude)
    val_x, val_y = ds.split("val", exclude)
    order = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(seed))[:num_fid]
    val_x, val_y = val_x[order], val_y[order]
    n_fid = len(val_x)
    train_feats, _ = embed(clf, train_x)
    ref = {"feats": train_feats.numpy(), "images": train_x, "classes": sorted(set(train_y.tolist()))}
    floor = _score("real held-out (floor)", val_x, val_y.tolist(), clf=clf, ref=ref, n_fid=n_fid,
                   num_classes=ds.num_classes, seed=seed)
    counts = np.bincount(val_y.numpy(), minlength=ds.num_classes)
    out: dict = {"floor": floor, "n_fid": n_fid, "rows": []}
    for g in [guidance, *[x for x in FID_GUIDANCES if x != guidance]]:
        task = bar.add_task(f"class prompts (FID) g={g:g}", total=int(counts.sum()), info=CLASS_TEMPLATE)
        images, labels = [], []
        t0 = time.perf_counter()
        for c, count in enumerate(counts):
            done = 0
            while done < count:  # batches of at most 32 per pipeline call
                k = int(min(32, count - done))
                prompt = caption_for(ds.classes[c], {}, CLASS_TEMPLATE)
                images.append(text_to_image(pipe, prompt, num_samples=k, guidance=g, steps=steps,
                                            seed=seed + 1000 * c + done))
                labels += [c] * k
                done += k
                bar.update(task, advance=k)
        seconds = time.perf_counter() - t0
        generated = _to_unit(np.concatenate(images))
        row = _score(f"latent diffusion DDIM-{steps} g={g:g}", generated, labels, clf=clf, ref=ref, n_fid=n_fid,
                     num_classes=ds.num_classes, seconds=seconds, seed=seed)
        row["guidance"] = g
        if g == guidance:
            out["model"] = row
            picks = torch.cat([generated[torch.tensor(labels) == c][:4] for c in range(ds.num_classes)])
        else:
            out["rows"].append(row)
    return out, picks[:64]


def _inpaint_rows(pipe, clf, ds, exclude, bar, count, guidance, steps, seed) -> tuple[dict, torch.Tensor]:
    val_x, val_y = ds.split("val", exclude)
    order = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(seed + 1))[:count]
    images = ((val_x[order] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    labels = val_y[order].tolist()
    mask = centre_mask(images.shape[-1])
    rs = random.Random(seed)
    task = bar.add_task("inpainting", total=2 * len(images), info="centre quarter")
    rows: dict = {"mask": "centre square, half the side (a quarter of the area)", "images": len(images)}
    shown = []
    round_trip = [vae_round_trip_error(pipe, im, mask) for im in images]
    for name in ("own class", "another class"):
        outs, wanted, worst = [], [], 0.0
        for k, (im, y) in enumerate(zip(images, labels)):
            target = y if name == "own class" else rs.choice([c for c in range(ds.num_classes) if c != y])
            out = inpaint(pipe, caption_for(ds.classes[target], {}, CLASS_TEMPLATE), im, mask, guidance=guidance,
                          steps=steps, seed=seed + k)[0]
            worst = max(worst, float(np.abs(out.astype(np.int16) - im.astype(np.int16))[:, ~mask].max()))
            outs.append(out)
            wanted.append(target)
            bar.update(task, advance=1)
        pred = _predict(clf, np.stack(outs))
        rows[name] = {"class_accuracy": float(np.mean(pred == np.asarray(wanted))), "unmasked_max_error": worst}
        if name == "another class":
            for im, out in list(zip(images, outs))[:16]:
                shown += [_to_unit(im[None]), _to_unit(out[None])]
    rows["vae_round_trip_unmasked_mae"] = float(np.mean(round_trip))
    return rows, torch.cat(shown)


def _summary(out: dict) -> dict:
    h, f, i = out["heldout"], out["class_prompts"], out["inpainting"]
    s = {"heldout_class_accuracy": h["class_accuracy"], "heldout_class_accuracy_en": h["by_language"]["en"],
         "heldout_class_accuracy_zh": h["by_language"]["zh"]}
    for a, v in h["attributes"].items():
        s[f"{a}_agreement"] = v["agreement"]
    s.update(fid=f["model"].get("fid"), floor_fid=f["floor"].get("fid"), kid=f["model"].get("kid"),
             class_prompt_accuracy=f["model"].get("class_accuracy"), samples_per_s=f["model"].get("samples_per_s"),
             inpaint_own_class_accuracy=i["own class"]["class_accuracy"],
             inpaint_other_class_accuracy=i["another class"]["class_accuracy"],
             inpaint_unmasked_max_error=max(i["own class"]["unmasked_max_error"],
                                            i["another class"]["unmasked_max_error"]),
             vae_round_trip_unmasked_mae=i["vae_round_trip_unmasked_mae"])
    if s["fid"] is not None and s["floor_fid"]:
        s["fid_over_floor"] = s["fid"] / s["floor_fid"]
        for r in f["rows"]:
            if "fid" in r:
                s[f"fid_over_floor_g{r['guidance']:g}"] = r["fid"] / s["floor_fid"]
                s[f"class_prompt_accuracy_g{r['guidance']:g}"] = r.get("class_accuracy")
    return {k: v for k, v in s.items() if v is not None}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _section(out: dict, grids: dict[str, Path], root: Path) -> str:
    h, f, i = out["heldout"], out["class_prompts"], out["inpainting"]
    lines = ["## Text-to-image evaluation", "",
             f"DDIM-{out['steps']}, guidance {out['guidance']:g}; scored by the dataset's domain classifier.", "",
             f"Held-out phrasings ({h['prompts']} prompts: every class in {len(HELDOUT_TEMPLATES)} templates no training "
             f"caption used, {out['samples_per_prompt']} images each): prompt-class accuracy "
             f"{_pct(h['class_accuracy'])} (English {_pct(h['by_language']['en'])}, Chinese "
             f"{_pct(h['by_language']['zh'])}; unknown-token share of the prompts: English "
             f"{_pct(out['unknown_token_share']['en'])}, Chinese {_pct(out['unknown_token_share']['zh'])}).", "",
             "| attribute asked | images | agreement (chance 33%) | English | Chinese |", "|---|---:|---:|---:|---:|"]
    for a, v in h["attributes"].items():
        lines.append(f"| {a} | {v['images']} | {_pct(v['agreement'])} | {_pct(v['by_language']['en'])} | "
                     f"{_pct(v['by_language']['zh'])} |")
    lines += ["", "| held-out template | class accuracy |", "|---|---:|"]
    lines += [f"| `{t}` | {_pct(v)} |" for t, v in h["by_template"].items()]
    m, fl = f["model"], f["floor"]
    lines += ["", f"Class prompts (`{CLASS_TEMPLATE}`, one image per held-out image, n = {f['n_fid']}):", "",
              "| row | FID | KID | class accuracy | images/s |", "|---|---:|---:|---:|---:|",
              f"| {fl['name']} | {fl.get('fid', float('nan')):.3f} | {fl['kid']:.4f} | {_pct(fl.get('class_accuracy'))} "
              "| |",
              *[f"| {r['name']} | {r.get('fid', float('nan')):.3f} | {r['kid']:.4f} | {_pct(r.get('class_accuracy'))} "
                f"| {r.get('samples_per_s', 0):.1f} |" for r in [m, *f["rows"]]], "",
              f"Inpainting ({i['mask']}, {i['images']} held-out images): prompted with the image's own class "
              f"{_pct(i['own class']['class_accuracy'])}, with another class {_pct(i['another class']['class_accuracy'])} "
              f"classified as the prompted class; largest change of an unmasked pixel "
              f"{max(i['own class']['unmasked_max_error'], i['another class']['unmasked_max_error']):.0f} (of 255), "
              f"against a VAE round trip of {i['vae_round_trip_unmasked_mae']:.2f} mean absolute error there.", ""]
    for name, path in grids.items():
        lines.append(f"![{name}]({path.relative_to(root)})")
    return "\n".join(lines) + "\n"
