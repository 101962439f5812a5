"""The embedded CPU rollout engine: an HF causal LM driven by our own KV-cached sampling loop.

The decode loop is in :mod:`.decoding`, weight updates in :mod:`.weight_loading`; this class owns
the model, request validation, batching and the locks.

Concurrency: ``generate`` runs a batch in the caller's thread; ``agenerate`` hands the request to
one worker thread that batches whatever arrived within ``batch_wait_s`` (up to ``max_batch``).
A lock serialises batches and weight updates, so a weight update waits for the batch in flight
(or aborts it first, with ``abort_in_flight=True`` / ``pause()``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
import uuid
from typing import Dict, List, Optional, Sequence

import torch

from megatron_spo.rollout.embedded.decoding import Request, decode_batch, new_row
from megatron_spo.rollout.embedded.weight_loading import buckets_of, load_buckets
from megatron_spo.rollout.engine import EngineError, GenerateResult, RequestError, SamplingParams, WeightSource


class EmbeddedEngine:
    """In-process engine over an HF model directory (fp32 on CPU by default).

    Args:
        model_dir: HF checkpoint directory (config, weights, optionally a tokenizer; the tokenizer is
            only needed for stop strings).
        max_batch: largest batch the ``agenerate`` worker forms.
        batch_wait_s: how long (seconds) the worker waits for more requests after the first one.
        seed: seed of the engine's generator (rows without their own ``SamplingParams.seed``).
        max_context: context window in tokens (prompt + generation); default the config's
            ``max_position_embeddings``.
        pause_timeout_s: how long a synchronous ``generate`` waits for ``resume`` before raising.
        cache: "static" (default: one preallocated ``[B, H, P + N, D]`` KV buffer per layer, no
            per-step concatenation; finished rows are compacted away) or "dynamic" (HF DynamicCache).
    """

    name = "embedded"

    def __init__(self, model_dir: str, *, dtype: torch.dtype = torch.float32, max_batch: int = 64,
                 batch_wait_s: float = 0.005, seed: int = 0, max_context: Optional[int] = None,
                 pause_timeout_s: float = 600.0, cache: str = "static"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = str(model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).eval()
        self.tokenizer = self._load_tokenizer(self.model_dir)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_context = int(max_context or getattr(self.config, "max_position_embeddings", 2048))
        eos = getattr(self.config, "eos_token_id", None)
        gen_cfg = getattr(self.model, "generation_config", None)
        if gen_cfg is not None and getattr(gen_cfg, "eos_token_id", None) is not None:
            eos = gen_cfg.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        if cache not in ("static", "dynamic"):
            raise ValueError(f"cache must be 'static' or 'dynamic', got {cache!r}")
        self.cache_impl = cache
        self.max_batch = int(max_batch)
        self.batch_wait_s = float(batch_wait_s)
        self.pause_timeout_s = float(pause_timeout_s)
        self._generator = torch.Generator().manual_seed(seed)
        self._lock = threading.RLock()
        self._version = 0
        self._resumed = threading.Event()
        self._resumed.set()
        self._abort_epoch = 0  # bumped to abort every batch in flight
        self._inflight: Dict[str, Request] = {}
        self._queue: "queue.Queue[Request]" = queue.Queue()
        self._worker: Optional[threading.Thread] = None
        self._closed = False
        self.tokens_generated = 0

    @staticmethod
    def _load_tokenizer(path: str):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    # ----------------------------------------------------------------------------------- protocol

    @property
    def weight_version(self) -> int:
        return self._version

    def health(self) -> bool:
        return not self._closed and (self._worker is None or self._worker.is_alive())

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> List[GenerateResult]:
        """Generate one continuation per prompt (same settings for all), in order.

        Raises :class:`RequestError` naming the prompt index for an invalid prompt, before any work.
        """
        reqs = [self._make_request(p, sampling, None, index=i) for i, p in enumerate(prompts)]
        if not reqs:
            return []
        if not self._resumed.wait(self.pause_timeout_s):
            raise EngineError(f"embedded engine {self.model_dir}: paused for more than {self.pause_timeout_s} s")
        out: List[GenerateResult] = []
        for start in range(0, len(reqs), self.max_batch):
            out.extend(self._run_batch(reqs[start:start + self.max_batch]))
        return out

    async def agenerate(self, prompt: Sequence[int], sampling: SamplingParams,
                        request_id: Optional[str] = None) -> GenerateResult:
        """One prompt; concurrent calls (from any thread or event loop) are batched by the worker."""
        req = self._make_request(prompt, sampling, request_id)
        req.future = self.submit(req)
        try:
            return await asyncio.wrap_future(req.future)
        except asyncio.CancelledError:
            req.aborted = True  # stop decoding a row nobody waits for
            raise

    def submit(self, req: Request) -> concurrent.futures.Future:
        """Queue a request for the batching worker; the future resolves to its GenerateResult."""
        if self._closed:
            raise EngineError(f"embedded engine {self.model_dir}: closed")
        req.future = req.future or concurrent.futures.Future()
        self._ensure_worker()
        self._queue.put(req)
        return req.future

    def make_request(self, prompt: Sequence[int], sampling: SamplingParams,
                     request_id: Optional[str] = None) -> Request:
        """A validated request for :meth:`submit` (raises :class:`RequestError` when invalid)."""
        return self._make_request(prompt, sampling, request_id)

    def update_weights(self, source: WeightSource, version: int, *, abort_in_flight: bool = False) -> int:
        """Copy new weights in place and set the weight version; returns the number of tensors loaded.

        ``source`` is an HF checkpoint directory (str / Path) or an iterable of buckets, each a
        sequence of ``(hf_name, tensor)`` with checkpoint (file) names (checks and fused-tensor
        handling: :func:`~megatron_spo.rollout.embedded.weight_loading.load_buckets`). Waits for the
        batch in flight unless ``abort_in_flight`` aborts it (its rows finish with "abort").
        """
        if abort_in_flight:
            self._abort_epoch += 1
        buckets = buckets_of(source)
        with self._lock:
            loaded = load_buckets(self.model, buckets)
            self._version = int(version)
        return loaded

    def pause(self, mode: str = "abort") -> None:
        """Hold new requests until :meth:`resume`; ``mode="abort"`` also aborts the batch in flight
        (its rows return the tokens so far with finish_reason "abort"), ``"wait"`` lets it finish."""
        if mode not in ("abort", "wait"):
            raise ValueError(f"pause: mode must be 'abort' or 'wait', got {mode!r}")
        self._resumed.clear()
        if mode == "abort":
            self._abort_epoch += 1

    def resume(self) -> None:
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    def abort(self, request_id: Optional[str] = None) -> int:
        """Abort one in-flight/queued request by id, or all of them (None); returns how many."""
        if request_id is None:
            self._abort_epoch += 1
            return len(self._inflight)
        req = self._inflight.get(request_id)
        if req is None:
            return 0
        req.aborted = True
        return 1

    def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)  # type: ignore[arg-type]
            self._worker.join(timeout=10)

    # ------------------------------------------------------------------------------- internals

    def _make_request(self, prompt: Sequence[int], sampling: SamplingParams, request_id: Optional[str],
                      index: Optional[int] = None) -> Request:
        where = f"prompt {index}" if index is not None else f"request {request_id or '?'}"
        if not isinstance(sampling, SamplingParams):
            raise RequestError(f"{where}: sampling must be SamplingParams, got {type(sampling).__name__}")
        sampling.check()
        if sampling.stop and self.tokenizer is None:
            raise RequestError(f"{where}: stop strings need a tokenizer; {self.model_dir} has none")
        ids = list(prompt)
        if not ids:
            raise RequestError(f"{where}: empty prompt")
        for j, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise RequestError(f"{where}: token {j} = {t!r} is not an id in [0, {self.vocab_size})")
        if len(ids) >= self.max_context:
            raise RequestError(f"{where}: prompt has {len(ids)} tokens, the context window is "
                               f"{self.max_context} (prompt + at least one generated token must fit)")
        return Request(ids, sampling, request_id or uuid.uuid4().hex)

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._worker_loop, name="embedded-engine", daemon=True)
            self._worker.start()

    def _worker_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # type: ignore[arg-type]
                    break
                batch.append(nxt)
            self._resumed.wait()  # requests are held (not dropped) while paused
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self._run_batch(live)
            except BaseException as err:  # noqa: BLE001 - delivered to every waiting caller
                for r in live:
                    r.future.set_exception(EngineError(f"embedded engine {self.model_dir}: batch failed: {err!r}"))
                continue
            for r, res in zip(live, results):
                r.future.set_result(res)

    @torch.no_grad()
    def _run_batch(self, reqs: List[Request]) -> List[GenerateResult]:
        with self._lock:
            epoch = self._abort_epoch
            version = self._version
            for r in reqs:
                self._inflight[r.request_id] = r
            try:
                return self._decode(reqs, epoch, version)
            finally:
                for r in reqs:
                    self._inflight.pop(r.request_id, None)

    def _decode(self, reqs: List[Request], epoch: int, version: int) -> List[GenerateResult]:
        rows = [new_row(r, self.tokenizer, self.eos_ids, self.max_context) for r in reqs]
        return decode_batch(self.model, rows, pad_id=self.pad_id, cache_impl=self.cache_impl,
                            generator=self._generator, version=version,
                            aborted=lambda: self._abort_epoch != epoch, on_step=self._count_tokens)

    def _count_tokens(self, n: int) -> None:
        self.tokens_generated += n
