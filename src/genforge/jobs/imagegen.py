"""`genforge generate RUN --num-samples 64 [--class 3] [--guidance 3] [--steps 50] [--sampler ddim|ddpm]`.

Writes a PNG grid, the single images in a folder beside it (grid.png -> grid/0000.png ...) and
the settings as JSON (grid.json), for diffusion, VAE and GAN runs alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genforge.common.errors import GenforgeError
from genforge.common.progress import progress_bar
from genforge.common.runs import RunDir, atomic_dir, atomic_write_text
from genforge.data.image_labels import ImageLabelling, VisibleLabel, aigc_label
from genforge.data.image_watermark import InvisibleMark
from genforge.data.images import save_image_grid
from genforge.models.diffusion import DiffusionModel
from genforge.models.image_generators import load_image_generator

MAX_SAMPLES = 4096


def grid_scale(size: int) -> int:
    """Nearest-neighbour upscaling so a 16x16 image is visible in a viewer (at least ~64 px)."""
    return max(1, 64 // max(1, size))


def labelling_for(watermark: str | None = None, visible_label: bool = False) -> ImageLabelling:
    """`--watermark KEY` (invisible mark) and `--visible-label`; the AIGC metadata is always written."""
    return ImageLabelling(visible=VisibleLabel() if visible_label else None,
                          mark=InvisibleMark(watermark) if watermark is not None else None)


def generate_grid(run: str | Path, *, num_samples: int = 64, class_label: str | int | None = None,
                  guidance: float | None = None, steps: int | None = None, sampler: str = "ddim",
                  seed: int | None = None, out: str | Path | None = None, watermark: str | None = None,
                  visible_label: bool = False, backend: str = "torch") -> Path:
    """Sample `num_samples` images from an image run; return the grid's path.

    Without `class_label`, a conditional model cycles through its classes (one column per class).
    `seed` defaults to 0 so the same command gives the same images. Every PNG carries the AIGC label;
    `watermark` (a key) adds the invisible mark, `visible_label` the visible one. `backend="onnxruntime"`
    runs the UNet exported by `genforge export` (RUN/onnx, or `run` is the export folder itself).
    """
    labelling = labelling_for(watermark, visible_label)
    if backend == "onnxruntime":
        from genforge.models.onnx_runtime import find_export, load_onnx_diffusion

        folder = find_export(run)
        run_dir = RunDir(run) if RunDir(run).recipe_path.is_file() else None
    else:
        run_dir = RunDir.open(run)
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise GenforgeError(f"--num-samples: {num_samples} is out of range (1..{MAX_SAMPLES})", param="n")
    if out is None and run_dir is None:
        raise GenforgeError(f"--out is required: {run} is an export folder outside a run", param="out")
    out = Path(out) if out is not None else run_dir.samples_dir / "grid.png"
    if out.suffix.lower() != ".png":
        raise GenforgeError(f"--out: {out} must be a .png file (the grid is written as PNG)", param="out")
    model = load_onnx_diffusion(folder) if backend == "onnxruntime" else load_image_generator(run_dir.path)
    labels = model.labels_for(class_label, num_samples)
    seed = 0 if seed is None else int(seed)
    _, n_steps = model.check_request(labels=labels, guidance=guidance, steps=steps, sampler=sampler, n=num_samples)

    if isinstance(model, DiffusionModel):
        with progress_bar(transient=True) as bar:
            task = bar.add_task(f"{sampler} x{n_steps}", total=n_steps * -(-num_samples // 256), info="")
            images = model.sample(num_samples, labels=labels, guidance=guidance, steps=steps, sampler=sampler,
                                  seed=seed, on_step=lambda i, total: bar.advance(task))
    else:
        images = model.sample(num_samples, labels=labels, guidance=guidance, steps=steps, sampler=sampler, seed=seed)
    return write_images(images, out, settings={
        "run": str(run), "family": model.family, "num_samples": num_samples, "seed": seed,
        "class": None if labels is None else sorted({model.class_names[k] for k in labels}),
        "guidance": guidance, "steps": steps, "sampler": sampler if model.family == "diffusion" else None,
        "backend": backend},
        nrow=model.num_classes if labels is not None and class_label is None else None, labelling=labelling,
        fields={"model": Path(run).name, "run": str(run), "family": model.family})


def write_images(images: torch.Tensor, out: Path, settings: dict | None = None, nrow: int | None = None,
                 labelling: ImageLabelling | None = None, fields: dict | None = None) -> Path:
    """grid PNG at `out`, singles in out.parent / out.stem / NNNN.png, settings in out.stem.json; every PNG
    labelled (`fields`: model, run, family of the AIGC label; `labelling`: visible label / mark)."""
    from genforge.data.images import to_uint8

    labelling = labelling or ImageLabelling()
    fields = dict(fields or {})
    attributes = fields.pop("attributes", {})
    out.parent.mkdir(parents=True, exist_ok=True)
    size = int(images.shape[-1])
    with atomic_dir(out.parent / out.stem) as tmp:
        for i, arr in enumerate(to_uint8(images)):
            labelling.save(tmp / f"{i:04d}.png", arr, **fields, attributes={**attributes, "index": i})
    grid_label = aigc_label(labelling.producer, **fields, attributes={**attributes, "layout": "grid",
                                                                        "images": int(len(images))})
    save_image_grid(images, out, nrow=nrow, scale=grid_scale(size), label=grid_label, labelling=labelling)
    if settings is not None:
        atomic_write_text(out.with_suffix(".json"), json.dumps(settings, indent=2))
    return out
