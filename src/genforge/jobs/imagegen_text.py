"""`genforge generate RUN --prompt TEXT` for a text-to-image (latent-diffusion) run.

    genforge generate RUN --prompt "a thick, slanted three" --num-samples 16 --guidance 4 --seed 0 --out grid.png
    genforge generate RUN --prompt "a seven" --init-image in.png --strength 0.6 --out edit.png    # image-to-image
    genforge generate RUN --prompt "a seven" --init-image in.png --mask mask.png --out fix.png    # inpainting

Writes the grid PNG at --out, the single images beside it (grid/0000.png ...), the settings as
JSON (grid.json) and, for edits, a side-by-side PNG (grid-edit.png: input | mask | outputs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from genforge.common.errors import GenforgeError
from genforge.common.progress import progress_bar
from genforge.jobs.imagegen import grid_scale, labelling_for, write_images
from genforge.models import text_to_image as t2i

EDIT_OUTPUTS_SHOWN = 8  # the side-by-side shows the first few outputs; the grid has them all


def _default_out(run: Path) -> Path:
    run = Path(run)
    if (run / "recipe.yaml").is_file():
        return run / "samples" / "grid.png"
    if run.name == "model" and (run.parent / "recipe.yaml").is_file():
        return run.parent / "samples" / "grid.png"
    raise GenforgeError(f"--out is required: {run} is a model folder outside a run", param="out")


def _float(images: np.ndarray) -> torch.Tensor:
    """uint8 N x C x H x W -> [-1, 1] float, what the grid writers take (and turn back exactly)."""
    return torch.from_numpy(images).float() / 127.5 - 1


def generate_from_text(run: str | Path, prompt: str, *, negative_prompt: str | None = None, num_samples: int = 16,
                       guidance: float | None = None, steps: int | None = None, seed: int | None = None,
                       init_image: str | Path | None = None, strength: float | None = None,
                       mask: str | Path | None = None, out: str | Path | None = None, watermark: str | None = None,
                       visible_label: bool = False, backend: str = "torch") -> dict:
    """Text-to-image, image-to-image (`init_image`, `strength`) or inpainting (`init_image` + `mask`);
    returns the paths written and, for inpainting, the VAE round-trip error the copy-back hides.
    Every PNG carries the AIGC label; `watermark` (a key) adds the invisible mark, `visible_label` the
    visible one. `backend="onnxruntime"` runs the UNet exported by `genforge export` (RUN/onnx, or `run` is
    the export folder itself); the text encoder and VAE stay PyTorch."""
    out = Path(out) if out is not None else _default_out(Path(run))
    if out.suffix.lower() != ".png":
        raise GenforgeError(f"--out: {out} must be a .png file (the grid is written as PNG)", param="out")
    if mask is not None and init_image is None:
        raise GenforgeError("--mask needs --init-image (the image whose masked area is regenerated)", param="mask")
    if strength is not None and init_image is None:
        raise GenforgeError("--strength needs --init-image (it says how far to move away from it)",
                            param="strength")
    guidance = t2i.DEFAULT_GUIDANCE if guidance is None else float(guidance)
    steps = t2i.DEFAULT_STEPS if steps is None else int(steps)
    seed = 0 if seed is None else int(seed)
    strength = (1.0 if mask is not None else 0.6) if strength is None else float(strength)
    if backend == "onnxruntime":
        from genforge.models.onnx_runtime import find_export, load_onnx_text_to_image

        pipe = load_onnx_text_to_image(find_export(run))
    else:
        pipe = t2i.load_pipeline(run)
    long_prompt = t2i.read_meta(run).get("text_encoder", {}).get("long_prompt", "truncate")
    used = t2i.check_prompt(pipe, prompt, long_prompt=long_prompt)  # warns once, here
    if negative_prompt is not None:
        negative_prompt = t2i.check_prompt(pipe, negative_prompt, param="negative_prompt", long_prompt=long_prompt)
    kw = {"negative_prompt": negative_prompt, "num_samples": num_samples, "guidance": guidance, "steps": steps,
          "seed": seed}

    image = marked = None
    if init_image is not None:
        source = t2i.open_image(init_image, "init_image")
        image = t2i.read_image(pipe, source, "init_image")
        marked = t2i.read_mask(pipe, mask, source.size) if mask is not None else None
        run_steps = t2i.check_strength(strength, steps)
    else:
        run_steps = steps
    mode = "inpaint" if marked is not None else "image-to-image" if image is not None else "text-to-image"

    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"{mode} x{run_steps} steps", total=run_steps * -(-num_samples // t2i.BATCH), info="")
        kw["on_step"] = lambda done, total: bar.update(task, completed=done)
        if marked is not None:
            images = t2i.inpaint(pipe, used, image, marked, strength=strength, **kw)
        elif image is not None:
            images = t2i.image_to_image(pipe, used, image, strength, **kw)
        else:
            images = t2i.text_to_image(pipe, used, **kw)

    settings = {"run": str(run), "mode": mode, "prompt": prompt, "prompt_used": used,
                "negative_prompt": negative_prompt, "num_samples": num_samples, "guidance": guidance,
                "steps": steps, "seed": seed, "backend": backend}
    result: dict = {"grid": out, "edit": None}
    if image is not None:
        settings.update(init_image=str(init_image), strength=strength, mask=None if mask is None else str(mask))
    if marked is not None:
        keep = ~marked
        settings["unmasked_max_error"] = int(np.abs(images[:, :, keep].astype(int) - image[:, keep]).max())
        settings["vae_round_trip_error"] = result["vae_round_trip_error"] = t2i.vae_round_trip_error(
            pipe, image, marked)
    fields = {"model": Path(run).name, "run": str(run), "family": "latent-diffusion",
              "attributes": {"mode": mode, "prompt": prompt}}
    write_images(_float(images), out, settings=settings, labelling=labelling_for(watermark, visible_label),
                 fields=fields)
    if image is not None:
        result["edit"] = write_edit_strip(image, marked, images, out.with_name(out.stem + "-edit.png"))
    return result


def write_edit_strip(image: np.ndarray, mask: np.ndarray | None, outputs: np.ndarray, path: Path) -> Path:
    """One row: input | mask (white = regenerated) | the first outputs, written to a temp file and renamed."""
    from genforge.data.images import save_image_grid

    row = [image]
    if mask is not None:
        row.append(np.repeat(mask[None].astype(np.uint8) * 255, image.shape[0], axis=0))
    row.extend(outputs[:EDIT_OUTPUTS_SHOWN])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    save_image_grid(_float(np.stack(row)), tmp, nrow=len(row), scale=grid_scale(image.shape[-1]))
    os.replace(tmp, path)
    return path

