"""The vLLM routes of the embedded server, so the vLLM client's contract test runs against it.

``/v1/models``, ``/v1/completions`` (token-id prompts, ``logprobs``, ``token_ids``),
``/collective_rpc`` with the methods of :class:`megatron_spo.rollout.vllm_worker_ext.WorkerExtension`,
``/pause``, ``/resume``, ``/is_paused``, ``/sleep``, ``/wake_up``, ``/is_sleeping``,
``/reset_prefix_cache``.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List

from megatron_spo.rollout.embedded.route_base import Routes, json_response, parse_prompts, read_body, route
from megatron_spo.rollout.engine import GenerateResult, RequestError, SamplingParams
from megatron_spo.rollout.vllm_worker_ext import RPC_METHODS

_VLLM_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
              "stop_token_ids", "logprobs", "return_tokens_as_token_ids", "return_token_ids",
              "include_stop_str_in_output", "skip_special_tokens", "ignore_eos", "n", "stream", "request_id"}


def check_completion(body: Dict[str, Any]) -> None:
    """RequestError for a ``/v1/completions`` body asking for what this engine cannot honour."""
    unknown = sorted(set(body) - _VLLM_KEYS)
    if unknown:
        raise RequestError(f"unsupported key(s) {unknown}")
    if body.get("stream"):
        raise RequestError("stream=true is not supported by the embedded server")
    if body.get("n", 1) != 1:
        raise RequestError(f"n must be 1, got {body['n']!r}")
    if body.get("include_stop_str_in_output", True) is False:
        raise RequestError("include_stop_str_in_output=false is not supported: stop strings stay in the output")


def sampling_from_completion(body: Dict[str, Any]) -> SamplingParams:
    """The sampling settings of a (checked) ``/v1/completions`` body."""
    stop = body.get("stop") or ()
    return SamplingParams(
        max_new_tokens=int(body.get("max_tokens", 16)), temperature=float(body.get("temperature", 1.0)),
        top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", -1) or -1),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        stop_token_ids=tuple(body.get("stop_token_ids") or ()), ignore_eos=bool(body.get("ignore_eos", False)),
        seed=None if body.get("seed") is None else int(body["seed"]))


def completion_choice(i: int, prompt: List[int], res: GenerateResult, want_logprobs: bool,
                      tokenizer) -> Dict[str, Any]:
    """One result as ``choices[i]`` of a completion (ids, finish and stop reason, optional log-probs)."""
    matched = res.meta.get("matched") if res.finish_reason == "stop" else None
    choice = {"index": i, "text": tokenizer.decode(res.token_ids, skip_special_tokens=False) if tokenizer else "",
              "finish_reason": res.finish_reason, "stop_reason": matched,
              "token_ids": list(res.token_ids), "prompt_token_ids": list(prompt), "logprobs": None}
    if want_logprobs:
        choice["logprobs"] = {"token_logprobs": list(res.logprobs),
                              "tokens": [f"token_id:{t}" for t in res.token_ids],
                              "top_logprobs": None, "text_offset": []}
    return choice


class VLLMRoutes(Routes):
    """vLLM's OpenAI completions route and its dev/RL routes over the embedded engine."""

    @route("GET", "/v1/models")
    async def models(self, request):
        return json_response({"object": "list", "data": [{"id": self.state.served_model_name, "object": "model",
                                                           "max_model_len": self.engine.max_context}]})

    @route("POST", "/v1/completions")
    async def completions(self, request):
        self.check_awake()
        body = await read_body(request)
        check_completion(body)
        prompts = parse_prompts(body.get("prompt"), "prompt")
        sampling = sampling_from_completion(body)
        base = str(body.get("request_id") or uuid.uuid4().hex)
        results = await self.run(prompts, sampling, [f"{base}-{i}" for i in range(len(prompts))])
        want_logprobs = body.get("logprobs") is not None
        choices = [completion_choice(i, p, res, want_logprobs, self.engine.tokenizer)
                   for i, (p, res) in enumerate(zip(prompts, results))]
        n_out = sum(len(r.token_ids) for r in results)
        n_in = sum(len(p) for p in prompts)
        return json_response({"id": f"cmpl-{base}", "object": "text_completion", "model": self.state.served_model_name,
                              "choices": choices, "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                                            "total_tokens": n_in + n_out}})

    @route("POST", "/collective_rpc")
    async def collective_rpc(self, request):
        body = await read_body(request)
        method = body.get("method")
        if method not in RPC_METHODS:
            raise RequestError(f"collective_rpc: unknown method {method!r}; known: {sorted(RPC_METHODS)}")
        args = body.get("args") or []
        if not all(isinstance(a, str) for a in args):
            raise RequestError("collective_rpc: args must be strings")
        if method == "update_weights_from_disk":
            path, version = (list(args) + [None, None])[:2]
            out = await self.update(path, version, False)
            return json_response({"results": [out["weight_version"]]})
        return json_response({"results": [str(self.engine.weight_version)]})

    @route("POST", "/pause")
    async def pause(self, request):
        mode = request.query.get("mode", "abort")
        self.engine.pause("abort" if mode == "abort" else "wait")
        return json_response({"status": "paused"})

    @route("POST", "/resume")
    async def resume(self, request):
        self.engine.resume()
        return json_response({"status": "resumed"})

    @route("GET", "/is_paused")
    async def is_paused(self, request):
        return json_response({"is_paused": self.engine.paused})

    @route("POST", "/sleep")
    async def sleep(self, request):
        self.engine.pause("abort")
        self.state.sleeping = True
        return json_response({"status": "sleeping", "level": int(request.query.get("level", 1))})

    @route("POST", "/wake_up")
    async def wake_up(self, request):
        self.state.sleeping = False
        self.engine.resume()
        return json_response({"status": "awake", "tags": request.query.getall("tags", None)})

    @route("GET", "/is_sleeping")
    async def is_sleeping(self, request):
        return json_response({"is_sleeping": self.state.sleeping})

    @route("POST", "/reset_prefix_cache")
    async def reset_prefix_cache(self, request):
        return json_response({"success": True, "message": "ok"})
