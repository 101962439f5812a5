"""SGLang HTTP client: the :class:`Engine` protocol over SGLang's native routes.

Generation uses ``POST /generate`` with ``input_ids`` and ``return_logprob``; token ids and
log-probs come from ``meta_info.output_token_logprobs`` (``[logprob, token_id, text|null]``), never
from re-tokenised text. ``finish_reason.type == "abort"`` (the server was paused or a weight update
aborted the request) becomes ``GenerateResult.finish_reason == "abort"``: retry or drop.

Weight updates:
* a path (str): ``/update_weights_from_disk`` — works everywhere (trainer and server share a
  filesystem);
* buckets with ``weight_transfer="tensor"`` (default): ``/update_weights_from_tensor`` with the
  CPU-safe envelope of :func:`megatron_spo.rollout.weight_formats.encode_bucket` (base64 safetensors,
  ``load_format="safetensors_b64"``). Only our embedded server accepts it; real SGLang expects
  CUDA-IPC ``MultiprocessingSerializer`` payloads, which only make sense colocated on one GPU;
* buckets with ``weight_transfer="distributed"`` (GPU): after :meth:`init_weights_update_group`,
  ``/update_weights_from_distributed`` announces names/dtypes/shapes and the trainer broadcasts
  each tensor from rank 0 of an NCCL group the server joined.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Dict, List, Optional, Sequence

from megatron_spo.rollout.engine import FINISH_REASONS, GenerateResult, SamplingParams, WeightSource
from megatron_spo.rollout.http_base import HttpEngineClient
from megatron_spo.rollout.weight_formats import encode_bucket


def sglang_sampling(s: SamplingParams) -> Dict[str, Any]:
    """SamplingParams -> SGLang ``sampling_params`` (stop strings kept, special tokens not skipped)."""
    out: Dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                           "top_k": s.top_k if s.top_k > 0 else -1, "stop": list(s.stop),
                           "stop_token_ids": list(s.stop_token_ids), "ignore_eos": s.ignore_eos,
                           "skip_special_tokens": False, "no_stop_trim": True, "n": 1}
    if s.seed is not None:
        out["sampling_seed"] = s.seed
    return out


def parse_sglang_item(item: Dict[str, Any], fallback_version: int) -> GenerateResult:
    """One ``/generate`` answer object -> GenerateResult (raises KeyError/ValueError on garbage)."""
    meta = item["meta_info"]
    pairs = meta["output_token_logprobs"]
    ids = [int(p[1]) for p in pairs]
    lps = [float(p[0]) for p in pairs]
    if "output_ids" in item and list(item["output_ids"]) != ids:
        raise ValueError("output_ids and output_token_logprobs disagree")
    fr = meta["finish_reason"] or {"type": "abort"}
    kind = fr["type"] if isinstance(fr, dict) else str(fr)
    if kind not in FINISH_REASONS:
        raise ValueError(f"finish_reason type {kind!r} not in {FINISH_REASONS}")
    wv = meta.get("weight_version")
    try:
        version = int(wv) if wv is not None else fallback_version
    except (TypeError, ValueError):
        version = fallback_version  # a non-numeric tag of another trainer: keep ours
    return GenerateResult(ids, lps, kind, version, int(meta.get("prompt_tokens", 0)),
                          {"request_id": meta.get("id"), "matched": fr.get("matched") if isinstance(fr, dict) else None,
                           "weight_version_tag": wv})


class SGLangClient(HttpEngineClient):
    """Engine protocol over an SGLang server (or the embedded server, which speaks the same subset)."""

    name = "sglang"

    def __init__(self, url: str, *, weight_transfer: str = "tensor", **kwargs):
        super().__init__(url, **kwargs)
        if weight_transfer not in ("tensor", "distributed"):
            raise ValueError(f"weight_transfer must be 'tensor' or 'distributed', got {weight_transfer!r}")
        self.weight_transfer = weight_transfer
        self._group = None
        self._group_name = "weight_update_group"

    # ------------------------------------------------------------------------------- generation

    def _body(self, prompts, sampling: SamplingParams, rid) -> Dict[str, Any]:
        body: Dict[str, Any] = {"input_ids": prompts, "sampling_params": sglang_sampling(sampling),
                                "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 0,
                                "stream": False}
        if rid is not None:
            body["rid"] = rid
        return body

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> List[GenerateResult]:
        prompts = [list(p) for p in prompts]
        if not prompts:
            return []

        def parse(data):
            items = data if isinstance(data, list) else [data]
            if len(items) != len(prompts):
                raise ValueError(f"{len(items)} answers for {len(prompts)} prompts")
            return [parse_sglang_item(it, self._version) for it in items]

        return self.request("POST", "/generate", self._body(prompts, sampling, None), timeout_s=self.timeout_s,
                            parse=parse)

    async def agenerate(self, prompt: Sequence[int], sampling: SamplingParams,
                        request_id: Optional[str] = None) -> GenerateResult:
        return await self.arequest("POST", "/generate", self._body(list(prompt), sampling, request_id),
                                   timeout_s=self.timeout_s, parse=lambda d: parse_sglang_item(d, self._version))

    def abort(self, request_id: Optional[str] = None) -> None:
        """Abort one request (by rid) or all; the aborted ones return finish_reason "abort"."""
        body = {"abort_all": True} if request_id is None else {"rid": request_id}
        self.request("POST", "/abort_request", body)

    # ---------------------------------------------------------------------------- weights/control

    def update_weights(self, source: WeightSource, version: int) -> None:
        if isinstance(source, (str, os.PathLike)):
            self.request("POST", "/update_weights_from_disk",
                         {"model_path": str(source), "weight_version": str(version), "flush_cache": True,
                          "abort_all_requests": False}, parse=self._success)
        elif self.weight_transfer == "distributed":
            self._update_distributed(source, version)
        else:
            buckets = [list(b) for b in source]
            for i, bucket in enumerate(buckets):
                last = i == len(buckets) - 1
                self.request("POST", "/update_weights_from_tensor",
                             {"serialized_named_tensors": [encode_bucket(bucket)], "load_format": "safetensors_b64",
                              "flush_cache": last, "abort_all_requests": False,
                              "weight_version": str(version) if last else str(self._version)},
                             parse=self._success)
            if not buckets:
                self.request("POST", "/update_weight_version",
                             {"new_version": str(version), "abort_all_requests": False})
        self._version = int(version)

    @staticmethod
    def _success(data):
        if isinstance(data, dict) and data.get("success") is False:
            raise ValueError(f"server refused: {data.get('message')}")
        return data

    def init_weights_update_group(self, master_address: str, master_port: int, world_size: int,
                                  backend: str = "nccl", group_name: str = "weight_update_group") -> None:
        """Create the NCCL group trainer rank 0 (rank 0) shares with the server's GPUs (ranks 1..).

        GPU only. The server joins in its handler while we join here, so the HTTP call runs in a
        thread. Uses SGLang's own ``init_custom_process_group`` helper (``sglang`` extra).
        """
        from megatron_spo.optional import require

        utils = require("sglang.srt.utils", "SGLang NCCL weight sync")
        body = {"master_address": master_address, "master_port": int(master_port), "rank_offset": 1,
                "world_size": int(world_size), "group_name": group_name, "backend": backend}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(self.request, "POST", "/init_weights_update_group", body, parse=self._success)
            self._group = utils.init_custom_process_group(
                backend=backend, init_method=f"tcp://{master_address}:{master_port}", world_size=int(world_size),
                rank=0, group_name=group_name)
            fut.result()
        self._group_name = group_name

    def _update_distributed(self, buckets, version: int) -> None:
        import torch
        import torch.distributed as dist

        if self._group is None:
            raise RuntimeError(f"{self.url}: call init_weights_update_group before distributed weight updates")
        buckets = [list(b) for b in buckets]
        for i, bucket in enumerate(buckets):
            last = i == len(buckets) - 1
            body = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket], "group_name": self._group_name,
                    "flush_cache": last, "abort_all_requests": False,
                    "weight_version": str(version) if last else None}
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                fut = pool.submit(self.request, "POST", "/update_weights_from_distributed", body, parse=self._success)
                for _, t in bucket:
                    dist.broadcast(t.detach().to("cuda", non_blocking=True).contiguous(), src=0, group=self._group)
                torch.cuda.synchronize()
                fut.result()

    def flush_cache(self) -> None:
        self.request("POST", "/flush_cache")

    def pause(self, mode: str = "abort") -> None:
        self.request("POST", "/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self.request("POST", "/continue_generation", {})

    def release_memory_occupation(self, tags: Optional[List[str]] = None) -> None:
        self.request("POST", "/release_memory_occupation", {"tags": tags}, parse=self._success)

    def resume_memory_occupation(self, tags: Optional[List[str]] = None) -> None:
        self.request("POST", "/resume_memory_occupation", {"tags": tags}, parse=self._success)

    def server_info(self) -> Dict[str, Any]:
        return self.request("GET", "/get_server_info")
