"""Exported models on onnxruntime: an LM that generates incrementally over its KV cache, and a UNet that
stands in for the diffusers one inside the Python scheduler loops.

    lm = OrtCausalLM(folder)                         # model.onnx + the tokenizer files + genforge_export.json
    for event in generate_onnx(lm, prompt_ids, SamplingParams(...)): ...
    unet = OrtUNet(folder)                           # drop-in for UNet2DModel / UNet2DConditionModel

Generation takes the same pieces as the PyTorch path (models/generation.py): a `Sequence` per request
(stop strings, EOS, length, incremental detokenization) and the `BatchSampler` (greedy, temperature,
top-k, top-p, penalties, seeds), so the same seed picks the same tokens from the same logits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from genforge.common.errors import RunError
from genforge.models.generation import Sequence, TokenEvent, eos_token_ids
from genforge.models.onnx_export import lm_io_names, require
from genforge.models.sampling import BatchSampler, SamplingParams

EXPORT_FILE = "genforge_export.json"
MODEL_FILE = "model.onnx"


def read_export(folder: str | Path) -> dict:
    """genforge_export.json of an export folder; RunError when `folder` is not one."""
    path = Path(folder) / EXPORT_FILE
    if not path.is_file() or not (Path(folder) / MODEL_FILE).is_file():
        raise RunError(f"{folder} is not an ONNX export folder (no {EXPORT_FILE} and {MODEL_FILE}); "
                       f"make one with `genforge export RUN --format onnx --out DIR`")
    return json.loads(path.read_text(encoding="utf-8"))


def is_export_folder(path: str | Path) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()


def make_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session with `threads` intra-op threads (default: torch's, so a comparison with
    PyTorch runs both on the same cores) and one inter-op thread (a decode step is a chain of small ops)."""
    require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtCausalLM:
    """An exported causal LM (models/onnx_export.py) on onnxruntime, one sequence at a time: `prefill`
    runs the prompt and keeps its KV cache, each `step` feeds one token and extends the cache."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        from transformers import AutoTokenizer, GenerationConfig

        self.folder = Path(folder)
        self.record = read_export(self.folder)
        if self.record.get("kind") != "causal-lm":
            raise RunError(f"{folder} holds an exported {self.record.get('kind')}, not a language model")
        io = self.record["io"]
        self.num_layers, self.kv_heads, self.head_dim = io["num_layers"], io["num_kv_heads"], io["head_dim"]
        self.vocab_size = int(io["vocab_size"])
        self.max_model_len = int(self.record["max_model_len"])
        self.session = make_session(self.folder / MODEL_FILE, threads)
        self.input_names, self.output_names = lm_io_names(self.num_layers)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        generation = (GenerationConfig.from_pretrained(self.folder)
                      if (self.folder / "generation_config.json").is_file() else None)
        # eos_token_ids reads the tokenizer's and the generation config's EOS, as for a PyTorch model
        self.eos_ids = eos_token_ids(SimpleNamespace(generation_config=generation), self.tokenizer)
        self.past: list[np.ndarray] = []
        self.length = 0

    def _run(self, ids: list[int]) -> torch.Tensor:
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, self.length + n), dtype=np.int64),
                "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None]}
        feed.update(zip(self.input_names[3:], self.past))
        logits, *self.past = self.session.run(self.output_names, feed)
        self.length += n
        return torch.from_numpy(logits[0])

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """A fresh cache from the prompt `ids`; the logits at every prompt position (T x vocab)."""
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        self.past, self.length = [empty] * (2 * self.num_layers), 0
        return self._run(list(ids))

    def step(self, token: int) -> torch.Tensor:
        """The next position's logits (vocab) after `token`, appended to the cache."""
        return self._run([int(token)])[0]


def generate_onnx(lm: OrtCausalLM, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
    """One sequence from prompt to finish on onnxruntime, a TokenEvent per token (the last has the finish
    reason): the prompt once, then one cached step per token."""
    params.validate(lm.max_model_len, len(prompt_ids))
    seq = Sequence(prompt_ids, params, lm.tokenizer, eos_ids=lm.eos_ids, vocab_size=lm.vocab_size,
                   max_model_len=lm.max_model_len)
    sampler = BatchSampler()
    logits = lm.prefill(prompt_ids)[-1]
    while True:
        tokens, lps, tops = sampler(logits[None].clone(), [seq.sampler])  # the sampler edits logits in place
        event = seq.accept(tokens[0], lps[0], tops[0])
        yield event
        if seq.finished:
            return
        logits = lm.step(tokens[0])


class _UNetConfig(dict):
    """A UNet's config.json with attribute access, as diffusers' pipelines read `unet.config.x`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class OrtUNet(torch.nn.Module):
    """An exported UNet (models/onnx_export.py) behind the diffusers UNet call, `unet(sample, t,
    class_labels=... | encoder_hidden_states=..., return_dict=...)`, so DiffusionModel's loop and
    StableDiffusionPipeline run it unchanged (the scheduler, guidance, text encoder and VAE stay PyTorch)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        super().__init__()
        folder = Path(folder)
        self.record = read_export(folder)
        self.config = _UNetConfig(json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8")))
        self.condition = self.record["io"]["condition"]
        self.session = make_session(folder / MODEL_FILE, threads)

    device = torch.device("cpu")
    dtype = torch.float32

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, return_dict: bool = True, **unused):
        n = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(n)
        feed = {"sample": sample.detach().float().cpu().numpy(), "timestep": t.contiguous().numpy()}
        if self.condition == "class_labels":
            if class_labels is None:  # unconditional sampling of a conditional model is its null class
                class_labels = torch.full((n,), int(self.config["num_class_embeds"]) - 1)
            feed["class_labels"] = class_labels.detach().long().cpu().numpy()
        elif self.condition == "encoder_hidden_states":
            feed["encoder_hidden_states"] = encoder_hidden_states.detach().float().cpu().numpy()
        out = torch.from_numpy(self.session.run(["noise_pred"], feed)[0]).to(sample.dtype)
        return SimpleNamespace(sample=out) if return_dict else (out,)



# ------------------------------------------------------------------------------------------- loaders

def find_export(path: str | Path) -> Path:
    """The export folder `path` is, or the run's default one (RUN/onnx); RunError naming the command
    that makes one when there is neither."""
    path = Path(path)
    for folder in (path, path / "onnx"):
        if is_export_folder(folder):
            read_export(folder)  # model.onnx present too
            return folder
    raise RunError(f"no ONNX export found at {path} or {path / 'onnx'}; make one with `genforge export {path} "
                   f"--format onnx` (it writes {path / 'onnx'}), or pass an export folder")


def load_onnx_diffusion(folder: str | Path, threads: int | None = None):
    """A DiffusionModel (models/diffusion.py) whose UNet runs on onnxruntime; its DDIM/DDPM loop,
    guidance and class names as for the PyTorch model."""
    from diffusers import DDPMScheduler

    from genforge.models.diffusion import META_FILE, DiffusionModel

    folder = Path(folder)
    unet = OrtUNet(folder, threads)
    if unet.record.get("kind") != "unet":
        raise RunError(f"{folder} holds an exported {unet.record.get('kind')}, not a class-conditional diffusion UNet")
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8")) if (folder / META_FILE).is_file() else {}
    return DiffusionModel(unet, DDPMScheduler.from_pretrained(folder / "scheduler"), meta.get("classes"))


def load_onnx_text_to_image(folder: str | Path, threads: int | None = None):
    """The StableDiffusionPipeline of a text-to-image export: text encoder, VAE and scheduler from the
    folder (PyTorch), the UNet on onnxruntime."""
    from genforge.models.text_to_image import load_pipeline

    unet = OrtUNet(folder, threads)
    if unet.record.get("kind") != "text-unet":
        raise RunError(f"{folder} holds an exported {unet.record.get('kind')}, not a text-to-image UNet")
    return load_pipeline(folder, unet=unet)
