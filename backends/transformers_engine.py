"""The `backend: transformers` engine: a local Hugging Face causal LM serving its requests as one running batch."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Any

import msgspec

from backends.base import EngineStats
from backends.constrained import held_from
from backends.engine_requests import Plan, check_request
from backends.engine_responses import StreamChunks, chat_choice, completion_choice
from backends.tool_format import template_messages
from config.schema import EnginesConfig, TransformersModel
from protocol.errors import BadRequest, GatewayError, ServiceUnavailable
from protocol.openai import ChatCompletion, Completion, ParsedRequest, Usage, new_id

if TYPE_CHECKING:  # torch loads only in the worker thread, so importing this module stays cheap
    from backends.batching import Group, Job, Scheduler
    from backends.constrained import Grammars
    from backends.generation import DecodeResult, OnText, SamplingParams, SequenceDecoder

__all__ = ["TransformersBackend"]

_encoder = msgspec.json.Encoder()


# ---- the loaded model (used only from the worker thread) ------------------------------------------------


class _Engine:
    """Tokenizer + model. `prepare` runs in the backend's worker thread; `prefill`, `decode` and `decoder` in
    its scheduler's thread (the StepModel of backends/batching.py)."""

    def __init__(self, cfg: TransformersModel, engines: EnginesConfig) -> None:
        import inspect

        import torch

        from backends.model_loader import load_model

        # process-wide: the last engine to load sets it
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        # validated, a GGUF converted once into engines.cache_dir, cast to cfg.dtype, quantized if asked
        self.tokenizer, self.lm = load_model(cfg, engines)
        params = inspect.signature(self.lm.forward).parameters
        # transformers 5 renamed past_key_values -> cache and num_logits_to_keep -> logits_to_keep
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        # prefill projects only the last position onto the vocabulary
        self._keep = {keep: 1} if keep else {}
        config = self.lm.config
        self.window = cfg.context_window or getattr(config, "max_position_embeddings", None) or 2048
        self.vocab = self.lm.get_input_embeddings().num_embeddings
        self.eos_ids = self._eos_ids()
        # forward passes so far (prefills and batched decode steps), live while generations run:
        # shows how soon an abandoned generation stopped
        self.forward_passes = 0
        gen = self.lm.generation_config
        # temperature absent: sample only if the model's generation_config asks for it, else greedy
        self.sample_by_default = bool(getattr(gen, "do_sample", False))
        self.default_temperature = float(getattr(gen, "temperature", None) or 1.0)
        self.default_top_p = float(getattr(gen, "top_p", None) or 1.0)
        self.default_top_k = int(getattr(gen, "top_k", None) or 0)
        # a template that knows tools renders them itself; others get them in the system prompt
        self.native_tools = "tools" in str(getattr(self.tokenizer, "chat_template", None) or "")
        self._grammars: Grammars | None = None
        self.token_bytes: list[bytes] | None = None  # each token's bytes, once a request asks for logprobs

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for value in (self.tokenizer.eos_token_id, self.lm.generation_config.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return frozenset(ids)

    # ---- prompts

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler, made on first use (the worker thread): plain requests never pay for it."""
        if self._grammars is None:
            from backends.constrained import Grammars

            self._grammars = Grammars(self.tokenizer, self.vocab, self.eos_ids)
        return self._grammars

    def prepare(self, plan: Plan) -> tuple[list[Job], int]:
        """Template/tokenize, compile the grammar (cached), check the context window, make one job per choice
        -> (jobs, prompt tokens)."""
        from backends.batching import Job

        grammar = self.grammars.compile(plan.grammar) if plan.grammar is not None else None
        prefix = plan.messages[-1]["content"] if plan.continue_final_message else ""
        if grammar is not None and prefix and not self.grammars.accepts(grammar, prefix):
            raise BadRequest("The final assistant message does not fit the requested format, so it cannot be "
                             "continued under it.", param="messages")
        if plan.logprobs is not None and self.token_bytes is None:
            self.token_bytes = self.grammars.token_bytes()
        if plan.chat:
            prompts: list[list[int]] = [self._chat_ids(plan)]
            echoes = [""]
        else:
            prompts = [self._prompt_ids(p) for p in plan.prompts]
            pairs = zip(plan.prompts, prompts, strict=True)
            echoes = [self._echo(p, ids) if plan.echo else "" for p, ids in pairs]
        jobs = []
        for p, (ids, echo) in enumerate(zip(prompts, echoes, strict=True)):
            max_new = self._room(ids, plan, "messages" if plan.chat else "prompt")
            for j in range(plan.n):
                index = p * plan.n + j
                jobs.append(Job(index, ids, self._sampling(plan, max_new, index), echo, grammar, prefix))
        return jobs, sum(len(ids) for ids in prompts)

    def _chat_ids(self, plan: Plan) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("This model has no chat template; use /v1/completions.", param="messages")
        messages, tools = plan.messages, None
        if plan.tools is not None or any("tool_calls" in m or m["role"] == "tool" for m in messages):
            messages, tools = template_messages(messages, plan.tools, self.native_tools)
        try:
            encoded = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=plan.add_generation_prompt,
                continue_final_message=plan.continue_final_message,
                tokenize=True,
                return_dict=True,
            )
        except Exception as exc:  # jinja's TemplateError (e.g. roles must alternate) or ValueError
            raise BadRequest(f"The chat template rejected the messages: {exc}", param="messages") from None
        ids = encoded["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            if any(not 0 <= t < self.vocab for t in prompt):
                raise BadRequest(f"Token ids must lie in [0, {self.vocab}).", param="prompt")
            ids = prompt
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]  # an empty prompt: start from bos, as OpenAI does
        if not ids:
            raise BadRequest("'prompt' must not be empty.", param="prompt")
        return list(ids)

    def _echo(self, prompt: str | list[int], ids: list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=False)

    def _room(self, ids: list[int], plan: Plan, param: str) -> int:
        room = self.window - len(ids)
        if room < 1:
            raise BadRequest(
                f"This model's maximum context length is {self.window} tokens. However, your {param} "
                f"resulted in {len(ids)} tokens. Please reduce the length of the {param}.",
                param=param,
                code="context_length_exceeded",
            )
        # a max_tokens past the context window is capped rather than refused
        return min(plan.max_new_tokens or self.cfg.max_new_tokens_default, room)

    def _sampling(self, plan: Plan, max_new: int, index: int) -> SamplingParams:
        from backends.generation import SamplingParams

        temperature, top_p, top_k = plan.temperature, plan.top_p, plan.top_k
        if temperature is None:
            # OpenAI samples at 1.0 by default; a tiny local model answers far better greedily, so absent a
            # generation_config that asks for sampling, no temperature means greedy (deterministic)
            if self.sample_by_default:
                temperature = self.default_temperature
                top_p = self.default_top_p if top_p is None else top_p
                top_k = self.default_top_k if top_k is None else top_k
            else:
                temperature = 0.0
        held = held_from(plan.grammar)  # a stop string never cuts grammar-held output (a call, a JSON answer)
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=top_k or 0,
            repetition_penalty=plan.repetition_penalty,
            min_tokens=min(plan.min_tokens, max_new),
            ignore_eos=plan.ignore_eos,
            stop=() if held == "" else plan.stop,
            stop_until=held or None,
            seed=None if plan.seed is None else _wrap_seed(plan.seed + index),  # n choices: seed, seed+1, ...
            logprobs=plan.logprobs,
        )

    # ---- generation (the scheduler's thread)

    @cached_property
    def batchable(self) -> bool:
        """Whether sequences can share a left-padded cache: every layer a plain growing DynamicLayer."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self._new_cache(), "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def prefill(self, prompts: list[list[int]]) -> tuple[Any, Any, Any]:
        import torch

        self.forward_passes += 1
        cache = self._new_cache()
        width = max(len(p) for p in prompts)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=self.device)
        padded: dict[str, Any] = {}
        if not bool(mask.all()):  # left padding: masked, and positions that start at each prompt's first token
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            padded = {"attention_mask": mask.to(self.device), "position_ids": positions.to(self.device)}
        out = self.lm(input_ids=ids, use_cache=True, **padded, **{self._cache_kw: cache}, **self._keep)
        return cache, mask, out.logits[:, -1]

    def decode(self, cache: Any, tokens: Any, mask: Any, positions: Any) -> Any:
        self.forward_passes += 1
        device = self.device
        # explicit positions and mask: a row's position is its own length, whatever padding sits to its left
        out = self.lm(input_ids=tokens[:, None].to(device), attention_mask=mask.to(device),
                      position_ids=positions[:, None].to(device), use_cache=True, **{self._cache_kw: cache})
        return out.logits[:, -1]

    def decoder(self, job: Job, on_text: OnText | None) -> SequenceDecoder:
        from backends.generation import IncrementalDetokenizer, SequenceDecoder

        detokenizer = IncrementalDetokenizer(self.tokenizer)
        # each sequence its own grammar matcher and bitmask, even the n choices of one request
        constraint = self.grammars.constraint(job.grammar, job.grammar_prefix) if job.grammar is not None else None
        return SequenceDecoder(job.prompt_ids, job.params, self.eos_ids, detokenizer, on_text, self.device,
                               constraint)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.lm.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()


def _wrap_seed(seed: int) -> int:
    """A seed folded into int64 (torch takes seeds modulo 2**64, so the draws stay the same): the last choice
    of a request seeded near the top of the range wraps around instead of overflowing."""
    return (seed + 2**63) % 2**64 - 2**63


# ---- the backend (event-loop side) ----------------------------------------------------------------------


def _usage(prompt_tokens: int, results: list[DecodeResult]) -> Usage:
    done = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)


def _consume(future: asyncio.Future) -> None:
    # a load nobody awaits any more; retrieve its outcome so nothing is logged
    if not future.cancelled():
        future.exception()


def _threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is gone: nobody is listening
        pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class TransformersBackend:
    """A local model: a worker thread tokenizes, a scheduler thread decodes all running requests as one batch.

    Concurrent requests share forward passes (backends/batching.py): each joins the running batch at the next
    step boundary and leaves it when it ends or its client goes. Beyond `max_concurrency` sequences and
    `max_queue` waiting requests, a request gets EngineOverloaded (429) at once.
    """

    def __init__(self, model: TransformersModel, engines: EnginesConfig | None = None) -> None:
        self.model = model
        self.engines = engines or EnginesConfig()
        self._engine: _Engine | None = None
        self._scheduler: Scheduler | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loading: asyncio.Task[None] | None = None
        self._closed = False

    # ---- lifecycle

    async def start(self) -> None:
        """Load tokenizer and model in the worker thread; idempotent, concurrent callers share one load."""
        if self._engine is not None:
            return
        if self._loading is None:
            self._closed = False
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.model.id}")
            self._loading = asyncio.ensure_future(self._load(self._executor))
            self._loading.add_done_callback(_consume)
        loading = self._loading
        try:
            await asyncio.shield(loading)  # one caller giving up does not cancel the load for the others
        except Exception:
            if self._loading is loading:  # a later start() tries again
                self._loading = None
            raise

    async def _load(self, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        try:
            engine, scheduler = await loop.run_in_executor(executor, self._boot)
        except BaseException:
            executor.shutdown(wait=False)
            if self._executor is executor:
                self._executor = None
            raise
        if self._executor is executor:  # not closed meanwhile
            self._engine, self._scheduler = engine, scheduler
        else:
            await asyncio.to_thread(scheduler.close)

    def _boot(self) -> tuple[_Engine, Scheduler]:
        from backends.batching import Scheduler

        engine = _Engine(self.model, self.engines)
        scheduler = Scheduler(engine, self.model.max_concurrency, self.model.max_queue, name=f"engine-{self.model.id}")
        return engine, scheduler

    async def health(self) -> bool:
        return self._engine is not None

    def stats(self) -> EngineStats:
        """The live load: sequences in the running batch, requests queued, slots in use, measured tokens/s."""
        scheduler = self._scheduler
        if scheduler is None:
            return EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        running = scheduler.running
        return EngineStats(running=running, waiting=scheduler.waiting,
                           kv_cache_usage=min(1.0, running / scheduler.max_concurrency),
                           tokens_per_s=scheduler.tokens_per_s, queue_wait_s=scheduler.queue_wait_s)

    async def aclose(self) -> None:
        """Stop in-flight generations (within one step), stop the threads, and drop the weights."""
        self._closed = True
        executor, self._executor = self._executor, None
        scheduler, self._scheduler = self._scheduler, None
        self._loading, self._engine = None, None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.close)  # what still runs or waits ends as cancelled
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the freed weights' memory back to the driver

    def _shut(self) -> ServiceUnavailable:
        return ServiceUnavailable(f"Model '{self.model.id}' is shut down.")

    async def _ready(self) -> tuple[_Engine, Scheduler]:
        if self._closed:
            raise self._shut()
        try:
            await self.start()
        except Exception as exc:
            raise ServiceUnavailable(f"Model '{self.model.id}' failed to load: {exc}") from exc
        if self._engine is None or self._scheduler is None:
            raise self._shut()
        return self._engine, self._scheduler

    async def _outcome(self, future: asyncio.Future) -> Any:
        # the contract says backends raise GatewayErrors: a torch/tokenizer failure becomes a 500
        try:
            return await future
        except GatewayError:
            raise
        except Exception as exc:
            raise GatewayError(f"Model '{self.model.id}' failed: {exc}") from exc

    async def _prepare(self, request: ParsedRequest) -> tuple[Plan, _Engine, Scheduler, list[Job], int]:
        plan = check_request(request)  # 400s come before waiting for the model
        engine, scheduler = await self._ready()
        # a full engine refuses before tokenizing: a flood of 429s costs the worker nothing
        scheduler.check(plan.n * (1 if plan.chat else len(plan.prompts)))
        executor = self._executor
        if executor is None:
            raise self._shut()
        try:
            future = asyncio.get_running_loop().run_in_executor(executor, engine.prepare, plan)
        except RuntimeError:  # shut down under us
            raise self._shut() from None
        jobs, prompt_tokens = await self._outcome(future)
        return plan, engine, scheduler, jobs, prompt_tokens

    def _begin(self, scheduler: Scheduler, jobs: list[Job],
               queue: asyncio.Queue[tuple[str, int, Any] | None] | None) -> tuple[Group, asyncio.Future[None]]:
        """Hand the jobs to the scheduler; the future resolves when all have ended (events go to `queue`)."""
        from backends.batching import Group  # loaded with the engine

        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def on_done() -> None:  # the scheduler's thread
            if queue is not None:
                _threadsafe(loop, queue.put_nowait, None)
            _threadsafe(loop, _resolve, done)

        on_event = None
        if queue is not None:
            def on_event(kind: str, index: int, value: Any) -> None:
                _threadsafe(loop, queue.put_nowait, (kind, index, value))

        group = Group(jobs, on_event, on_done)
        try:
            scheduler.submit(group)  # EngineOverloaded when the batch and the queue are full
        except RuntimeError:  # closed under us
            raise self._shut() from None
        return group, done

    def _results(self, group: Group) -> list[DecodeResult]:
        if group.error is not None:
            raise GatewayError(f"Model '{self.model.id}' failed: {group.error}") from group.error
        results = group.ordered_results()
        if any(r.finish_reason == "cancelled" for r in results):
            raise ServiceUnavailable(f"Model '{self.model.id}' shut down during generation.")
        return results

    # ---- requests

    async def complete(self, request: ParsedRequest, deployment: int = 0,
                       headers: dict[str, str] | None = None) -> bytes:
        plan, engine, scheduler, jobs, prompt_tokens = await self._prepare(request)
        group, done = self._begin(scheduler, jobs, None)
        try:
            await done
        finally:
            if group.left:  # the client left (CancelledError): its sequences leave the batch
                scheduler.cancel(group)
        results = self._results(group)
        usage = _usage(prompt_tokens, results)
        head = {"created": int(time.time()), "model": self.model.id, "usage": usage}
        vocab = engine.token_bytes if plan.logprobs is not None else None
        if plan.chat:
            choices = [chat_choice(plan, job.index, r, vocab) for job, r in zip(jobs, results, strict=True)]
            return _encoder.encode(ChatCompletion(id=new_id("chatcmpl"), choices=choices, **head))
        text_choices = [completion_choice(job.index, job.echo, r, vocab) for job, r in zip(jobs, results, strict=True)]
        return _encoder.encode(Completion(id=new_id("cmpl"), choices=text_choices, **head))

    async def stream(self, request: ParsedRequest, deployment: int = 0,
                     headers: dict[str, str] | None = None) -> AsyncIterator[bytes]:
        # everything that can fail with a 400 (or a 429) happens before the first chunk
        plan, engine, scheduler, jobs, prompt_tokens = await self._prepare(request)
        queue: asyncio.Queue[tuple[str, int, Any] | None] = asyncio.Queue()
        group, _ = self._begin(scheduler, jobs, queue)
        chunks = StreamChunks(plan, self.model.id, engine.token_bytes if plan.logprobs is not None else None)
        try:
            while (event := await queue.get()) is not None:
                kind, index, value = event
                for chunk in getattr(chunks, kind)(index, value):
                    yield chunk
            results = self._results(group)
            if plan.include_usage:
                yield chunks.usage(_usage(prompt_tokens, results))
        finally:
            if group.left:  # the consumer stopped iterating (client gone): its sequences leave the batch
                scheduler.cancel(group)
