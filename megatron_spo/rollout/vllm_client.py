"""vLLM HTTP client: the :class:`Engine` protocol over vLLM's OpenAI server and its dev/RL routes.

Generation uses ``POST /v1/completions`` with token-id prompts, ``logprobs: 0`` and
``return_token_ids``; the result is ``choices[i].token_ids`` and ``choices[i].logprobs.token_logprobs``
(never the text, never re-tokenised). vLLM returns ``finish_reason`` "abort" for requests cut by
``/pause?mode=abort``.

Log-probs: vLLM's default ``--logprobs-mode raw_logprobs`` reports ``log_softmax(logits)`` before
temperature; ``processed_logprobs`` reports them after temperature *and* top-k/top-p truncation. The
protocol's convention (after temperature, before truncation) coincides with both at temperature 1
without top-k/top-p, the training default; at other settings recompute in the trainer.

Weight updates go through :class:`megatron_spo.rollout.vllm_worker_ext.WorkerExtension` (launch vLLM
with ``--worker-extension-cls megatron_spo.rollout.vllm_worker_ext.WorkerExtension`` and
``VLLM_SERVER_DEV_MODE=1``) via ``POST /collective_rpc``: a checkpoint path (works on CPU). Buckets
are first written as one safetensors file into ``staging_dir`` (``/dev/shm`` by default when it
exists: a shared-memory hand-off on one node; pass a shared filesystem path across nodes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from megatron_spo.rollout.engine import FINISH_REASONS, GenerateResult, SamplingParams, WeightSource
from megatron_spo.rollout.http_base import HttpEngineClient


def parse_vllm_choice(choice: Dict[str, Any], prompt_len: int, version: int) -> GenerateResult:
    """One ``choices[i]`` entry -> GenerateResult (raises KeyError/ValueError on garbage)."""
    ids = [int(t) for t in choice["token_ids"]]
    lps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
    reason = choice["finish_reason"]
    if reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason {reason!r} not in {FINISH_REASONS}")
    return GenerateResult(ids, lps, reason, version, prompt_len, {"matched": choice.get("stop_reason")})


class VLLMClient(HttpEngineClient):
    """Engine protocol over a vLLM server (or the embedded server's vLLM routes)."""

    name = "vllm"

    def __init__(self, url: str, *, model: Optional[str] = None, staging_dir: Optional[str] = None, **kwargs):
        super().__init__(url, **kwargs)
        self._model = model
        self.staging_dir = staging_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)

    @property
    def model(self) -> str:
        """The served model name (asked from ``/v1/models`` once)."""
        if self._model is None:
            self._model = self.request("GET", "/v1/models", parse=lambda d: str(d["data"][0]["id"]))
        return self._model

    def _body(self, prompts, sampling: SamplingParams, request_id: Optional[str]) -> Dict[str, Any]:
        body: Dict[str, Any] = {
            "model": self.model, "prompt": prompts, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1, "stop": list(sampling.stop),
            "stop_token_ids": list(sampling.stop_token_ids), "ignore_eos": sampling.ignore_eos,
            "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True,
            "include_stop_str_in_output": True, "skip_special_tokens": False}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if request_id is not None:
            body["request_id"] = request_id
        return body

    def _parser(self, prompts: List[List[int]], request_id: Optional[str] = None):
        version = self._version

        def parse(data):
            choices = sorted(data["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts):
                raise ValueError(f"{len(choices)} choices for {len(prompts)} prompts")
            out = [parse_vllm_choice(c, len(p), version) for c, p in zip(choices, prompts)]
            for r in out:
                r.meta["request_id"] = request_id
            return out

        return parse

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> List[GenerateResult]:
        prompts = [list(p) for p in prompts]
        if not prompts:
            return []
        return self.request("POST", "/v1/completions", self._body(prompts, sampling, None),
                            timeout_s=self.timeout_s, parse=self._parser(prompts))

    async def agenerate(self, prompt: Sequence[int], sampling: SamplingParams,
                        request_id: Optional[str] = None) -> GenerateResult:
        prompts = [list(prompt)]
        out = await self.arequest("POST", "/v1/completions", self._body(prompts, sampling, request_id),
                                  timeout_s=self.timeout_s, parse=self._parser(prompts, request_id))
        return out[0]

    # ---------------------------------------------------------------------------- weights/control

    def update_weights(self, source: WeightSource, version: int) -> None:
        if isinstance(source, (str, os.PathLike)):
            self._rpc_update(str(source), version)
        else:
            from safetensors.torch import save_file

            tmp = tempfile.mkdtemp(prefix="mspo_weights_", dir=self.staging_dir)
            try:
                tensors = {n: t.detach().contiguous().cpu() for b in source for n, t in b}
                save_file(tensors, os.path.join(tmp, "model.safetensors"))
                self._rpc_update(tmp, version)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self._version = int(version)

    def _rpc_update(self, path: str, version: int) -> None:
        def parse(data):
            results = data["results"]
            if not results or any(str(r) != str(version) for r in results):
                raise ValueError(f"workers report weight versions {results}, expected {version}")
            return results

        self.request("POST", "/collective_rpc",
                     {"method": "update_weights_from_disk", "args": [path, str(version)]}, parse=parse, retries=0)
        self.request("POST", "/reset_prefix_cache")

    def flush_cache(self) -> None:
        self.request("POST", "/reset_prefix_cache")

    def pause(self, mode: str = "abort") -> None:
        self.request("POST", "/pause", params={"mode": mode})

    def resume(self) -> None:
        self.request("POST", "/resume")

    def release_memory_occupation(self, tags: Optional[List[str]] = None) -> None:
        self.request("POST", "/sleep", params={"level": 1})

    def resume_memory_occupation(self, tags: Optional[List[str]] = None) -> None:
        self.request("POST", "/wake_up", params={"tags": tags} if tags else None)
