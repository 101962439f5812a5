"""The embedded CPU rollout engine: an HF causal LM driven by our own KV-cached sampling loop.

Requests (token ids) are batched left-padded: ``input_ids``/``attention_mask`` ``[B, P]`` with
``position_ids = cumsum(mask) - 1``, one prefill forward, then one ``[B, 1]`` decode forward per
step reusing an HF KV cache (a preallocated ``StaticCache`` by default, so no per-step
concatenation). Rows that finish are dropped from the batch (and the cache), so a long tail does
not pay for finished rows. ``generate`` is not used: it cannot return
the untruncated sampling log-probs at temperature != 1 without storing ``[B, N, V]`` logits.

Concurrency: ``generate`` runs a batch in the caller's thread; ``agenerate`` hands the request to
one worker thread that batches whatever arrived within ``batch_wait_s`` (up to ``max_batch``).
A lock serialises batches and weight updates, so a weight update waits for the batch in flight
(or aborts it first, with ``abort_in_flight=True`` / ``pause()``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_spo.rollout.engine import (EngineError, GenerateResult, NamedTensorBucket, RequestError,
                                         SamplingParams, WeightSource)
from megatron_spo.rollout.sampling import StopStringMatcher, sample


@dataclass
class _Request:
    prompt: List[int]
    sampling: SamplingParams
    request_id: str
    future: Optional[concurrent.futures.Future] = None
    aborted: bool = False


@dataclass
class _Row:
    """Decode state of one request in a running batch."""

    req: _Request
    stopper: StopStringMatcher
    stop_ids: frozenset
    limit: int  # max tokens this row may generate (max_new_tokens clipped to the context)
    generator: Optional[torch.Generator]
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)


def load_hf_state(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (``*.safetensors``, else ``pytorch_model*.bin``)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        state: Dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        return state
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin files in {path!r}")
    state = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


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
        self._inflight: Dict[str, _Request] = {}
        self._queue: "queue.Queue[_Request]" = queue.Queue()
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

    def submit(self, req: _Request) -> concurrent.futures.Future:
        """Queue a request for the batching worker; the future resolves to its GenerateResult."""
        if self._closed:
            raise EngineError(f"embedded engine {self.model_dir}: closed")
        req.future = req.future or concurrent.futures.Future()
        self._ensure_worker()
        self._queue.put(req)
        return req.future

    def make_request(self, prompt: Sequence[int], sampling: SamplingParams,
                     request_id: Optional[str] = None) -> _Request:
        """A validated request for :meth:`submit` (raises :class:`RequestError` when invalid)."""
        return self._make_request(prompt, sampling, request_id)

    def update_weights(self, source: WeightSource, version: int, *, abort_in_flight: bool = False) -> int:
        """Copy new weights in place and set the weight version; returns the number of tensors loaded.

        ``source`` is an HF checkpoint directory (str / Path) or an iterable of buckets, each a
        sequence of ``(hf_name, tensor)`` with checkpoint (file) names. Each bucket is checked (names,
        shapes) before any of it is copied; buckets already copied stay applied if a later one is bad.
        Names of tensors transformers fuses in memory (MoE experts) are collected and applied at the
        end through transformers' own weight conversion. Waits for the batch in
        flight unless ``abort_in_flight`` aborts it (its rows finish with "abort").
        """
        if abort_in_flight:
            self._abort_epoch += 1
        if isinstance(source, (str, os.PathLike)):
            buckets: Iterable[NamedTensorBucket] = [list(load_hf_state(str(source)).items())]
        else:
            buckets = source
        params = self.model.state_dict(keep_vars=True)
        ckpt_shapes: Optional[Dict[str, Tuple[int, ...]]] = None
        pending: Dict[str, torch.Tensor] = {}  # checkpoint names of parameters fused in memory
        loaded = 0
        with self._lock, torch.no_grad():
            for b, bucket in enumerate(buckets):
                bucket = list(bucket)
                for name, tensor in bucket:
                    if name in params:
                        expected = tuple(params[name].shape)
                    else:
                        ckpt_shapes = ckpt_shapes or self._checkpoint_shapes()
                        if name not in ckpt_shapes:
                            raise ValueError(f"update_weights: bucket {b}: unknown parameter {name!r} "
                                             f"(model {type(self.model).__name__})")
                        expected = ckpt_shapes[name]
                    if tuple(tensor.shape) != expected:
                        raise ValueError(f"update_weights: bucket {b}: {name!r} has shape {tuple(tensor.shape)}, "
                                         f"model expects {expected}")
                for name, tensor in bucket:
                    if name in params:
                        params[name].data.copy_(tensor)
                    else:
                        pending[name] = tensor
                    loaded += 1
            if pending:
                self._load_converted(pending, params)
            self._version = int(version)
        return loaded

    def _checkpoint_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Checkpoint (HF file) names and shapes of every weight, as ``save_pretrained`` writes them."""
        return {n: tuple(t.shape) for n, t in self._checkpoint_state().items()}

    def _checkpoint_state(self) -> Dict[str, torch.Tensor]:
        # transformers 5 fuses some checkpoint tensors in memory (e.g. MoE experts into one
        # gate_up_proj); its own revert gives the per-tensor checkpoint layout back.
        state = self.model.state_dict()
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:  # transformers 4.x: memory names are checkpoint names
            return state
        return revert_weight_conversion(self.model, state)

    def _load_converted(self, pending: Dict[str, torch.Tensor], params: Dict[str, torch.Tensor]) -> None:
        """Apply checkpoint-named tensors whose parameters are fused in memory: transformers' own
        loader converts the full checkpoint-format state (current weights overlaid with ``pending``)."""
        full = self._checkpoint_state()
        full.update(pending)
        fresh = type(self.model).from_pretrained(None, config=self.model.config, state_dict=full,
                                                 dtype=self.model.dtype)
        for name, tensor in fresh.state_dict().items():
            params[name].data.copy_(tensor)

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
                      index: Optional[int] = None) -> _Request:
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
        return _Request(ids, sampling, request_id or uuid.uuid4().hex)

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

    def _new_row(self, req: _Request) -> _Row:
        s = req.sampling
        stop_ids = set(s.stop_token_ids)
        if not s.ignore_eos:
            stop_ids |= self.eos_ids
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        limit = min(s.max_new_tokens, self.max_context - len(req.prompt))
        return _Row(req, StopStringMatcher(self.tokenizer, s.stop), frozenset(stop_ids), limit, gen)

    @torch.no_grad()
    def _run_batch(self, reqs: List[_Request]) -> List[GenerateResult]:
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

    def _new_cache(self, total_len: int):
        from transformers import DynamicCache, StaticCache

        if self.cache_impl == "static":
            return StaticCache(config=self.model.config, max_cache_len=total_len)
        return DynamicCache(config=self.model.config)

    @staticmethod
    def _select_rows(cache, sel: torch.Tensor) -> None:
        """Keep only batch rows ``sel`` of the KV cache (finished rows leave the batch)."""
        from transformers import StaticCache

        if not isinstance(cache, StaticCache):
            cache.batch_select_indices(sel)
            return
        for layer in cache.layers:  # StaticLayer has no batch_select_indices: index its buffers
            if getattr(layer, "is_initialized", False):
                layer.keys = layer.keys.index_select(0, sel)
                layer.values = layer.values.index_select(0, sel)
                layer.batch_size = int(sel.numel())

    def _decode(self, reqs: List[_Request], epoch: int, version: int) -> List[GenerateResult]:
        rows = [self._new_row(r) for r in reqs]
        results: List[Optional[GenerateResult]] = [None] * len(rows)
        width = max(len(r.prompt) for r in reqs)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, width - len(r.prompt):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache(width + max(r.limit for r in rows))
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, cache_position=torch.arange(width), logits_to_keep=1).logits[:, -1]
        filled = width  # cache slots written so far (same for every row: rows are left-padded)
        next_pos = pos[:, -1] + 1
        active = list(range(len(rows)))

        def settings(idx: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            ss = [rows[i].req.sampling for i in idx]
            return (torch.tensor([s.temperature for s in ss], dtype=torch.float32),
                    torch.tensor([s.top_k for s in ss], dtype=torch.long),
                    torch.tensor([s.top_p for s in ss], dtype=torch.float32))

        temp, top_k, top_p = settings(active)
        while True:
            tok, lp = sample(logits, temp, top_k, top_p, self._generator, [rows[i].generator for i in active])
            tok_list, lp_list = tok.tolist(), lp.tolist()
            aborted_all = self._abort_epoch != epoch
            keep: List[int] = []
            for j, i in enumerate(active):
                row = rows[i]
                row.tokens.append(tok_list[j])
                row.logprobs.append(lp_list[j])
                reason, matched = None, None
                if tok_list[j] in row.stop_ids:
                    reason, matched = "stop", tok_list[j]
                else:
                    hit = row.stopper.match(row.tokens)
                    if hit is not None:
                        reason, matched = "stop", hit
                    elif len(row.tokens) >= row.limit:
                        reason = "length"
                    elif aborted_all or row.req.aborted:
                        reason = "abort"
                if reason is None:
                    keep.append(j)
                    continue
                meta = {"request_id": row.req.request_id, "matched": matched,
                        "context_truncated": reason == "length" and row.limit < row.req.sampling.max_new_tokens}
                results[i] = GenerateResult(row.tokens, row.logprobs, reason, version, len(row.req.prompt), meta)
            self.tokens_generated += len(active)
            if not keep:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long)
                self._select_rows(cache, sel)
                mask, next_pos, tok = mask[sel], next_pos[sel], tok[sel]
                active = [active[j] for j in keep]
                temp, top_k, top_p = settings(active)
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
            logits = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                past_key_values=cache, use_cache=True,
                                cache_position=torch.tensor([filled])).logits[:, -1]
            filled += 1
            next_pos = next_pos + 1
        return results  # type: ignore[return-value]
