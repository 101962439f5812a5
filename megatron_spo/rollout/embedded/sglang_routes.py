"""The SGLang-native routes of the embedded server (shapes in docs/engine_contracts.md §2).

``/generate`` (token ids only), ``/update_weights_from_disk``, ``/update_weights_from_tensor``,
``/update_weight_version``, ``/flush_cache``, ``/pause_generation``, ``/continue_generation``,
``/abort_request``, ``/release_memory_occupation``, ``/resume_memory_occupation``, ``/health``,
``/health_generate``, ``/get_server_info``, ``/get_model_info``.

``/update_weights_from_tensor`` on CPU takes base64 safetensors buckets
(``load_format: "safetensors_b64"``, see :mod:`megatron_spo.rollout.weight_formats`), never the
pickled payloads real SGLang expects. The NCCL routes answer 400: they need GPUs and real SGLang.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict

from megatron_spo.rollout.embedded.route_base import (Routes, error_response, json_response, parse_prompts,
                                                      read_body, route)
from megatron_spo.rollout.engine import GenerateResult, RequestError, SamplingParams
from megatron_spo.rollout.weight_formats import decode_bucket

# SGLang sampling keys that do not change what this engine computes (stop strings are always kept
# in the output and special tokens are never skipped, since only ids are returned).
_SGLANG_IGNORED = {"skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens", "n",
                   "min_new_tokens", "frequency_penalty", "presence_penalty", "repetition_penalty"}
_SGLANG_MAPPED = {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
                  "ignore_eos", "seed", "sampling_seed"}


def sampling_from_sglang(sp: Dict[str, Any]) -> SamplingParams:
    """SGLang ``sampling_params`` -> SamplingParams (RequestError for keys this engine cannot honour)."""
    if not isinstance(sp, dict):
        raise RequestError(f"sampling_params must be an object, got {type(sp).__name__}")
    unknown = sorted(set(sp) - _SGLANG_IGNORED - _SGLANG_MAPPED)
    if unknown:
        raise RequestError(f"sampling_params: unsupported key(s) {unknown}")
    if sp.get("n", 1) != 1:
        raise RequestError(f"sampling_params.n must be 1 (send the prompt n times), got {sp['n']!r}")
    stop = sp.get("stop") or ()
    seed = sp.get("sampling_seed", sp.get("seed"))
    return SamplingParams(
        max_new_tokens=int(sp.get("max_new_tokens", 128)), temperature=float(sp.get("temperature", 1.0)),
        top_p=float(sp.get("top_p", 1.0)), top_k=int(sp.get("top_k", -1)),
        stop=(stop,) if isinstance(stop, str) else tuple(stop), stop_token_ids=tuple(sp.get("stop_token_ids") or ()),
        ignore_eos=bool(sp.get("ignore_eos", False)), seed=None if seed is None else int(seed))


def sglang_item(res: GenerateResult, rid: str, want_logprob: bool, tokenizer) -> Dict[str, Any]:
    """One result as a ``/generate`` answer object (``text``, ``output_ids``, ``meta_info``)."""
    fr: Dict[str, Any] = {"type": res.finish_reason}
    if res.finish_reason == "length":
        fr["length"] = len(res.token_ids)
    elif res.finish_reason == "stop":
        fr["matched"] = res.meta.get("matched")
    else:
        fr["message"] = "aborted (pause, weight update or abort_request)"
    meta: Dict[str, Any] = {"id": rid, "prompt_tokens": res.prompt_len, "completion_tokens": len(res.token_ids),
                            "cached_tokens": 0, "finish_reason": fr, "weight_version": str(res.weight_version)}
    if want_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(res.logprobs, res.token_ids)]
    text = tokenizer.decode(res.token_ids, skip_special_tokens=False) if tokenizer is not None else ""
    return {"text": text, "output_ids": list(res.token_ids), "meta_info": meta}


class SGLangRoutes(Routes):
    """SGLang's native HTTP API over the embedded engine (the subset our SGLang client speaks)."""

    @route("POST", "/generate")
    async def generate(self, request):
        self.check_awake()
        body = await read_body(request)
        if body.get("stream"):
            raise RequestError("stream=true is not supported by the embedded server")
        if "input_ids" not in body:
            raise RequestError("input_ids is required (token ids in, token ids out; text prompts are not accepted)")
        single = bool(body["input_ids"]) and all(isinstance(t, int) for t in body["input_ids"])
        prompts = parse_prompts(body["input_ids"], "input_ids")
        rid = body.get("rid")
        if rid is None:
            rids = [uuid.uuid4().hex for _ in prompts]
        elif isinstance(rid, str):
            rids = [rid] if single else [f"{rid}-{i}" for i in range(len(prompts))]
        else:
            rids = [str(x) for x in rid]
        sampling = sampling_from_sglang(body.get("sampling_params", {}))
        results = await self.run(prompts, sampling, rids)
        items = [sglang_item(r, rid, bool(body.get("return_logprob")), self.engine.tokenizer)
                 for r, rid in zip(results, rids)]
        return json_response(items[0] if single else items)

    @route("POST", "/update_weights_from_disk")
    async def update_from_disk(self, request):
        body = await read_body(request)
        if not body.get("model_path"):
            raise RequestError("model_path is required")
        return json_response(await self.update(body["model_path"], body.get("weight_version"),
                                               bool(body.get("abort_all_requests"))))

    @route("POST", "/update_weights_from_tensor")
    async def update_from_tensor(self, request):
        body = await read_body(request)
        fmt = body.get("load_format")
        if fmt not in (None, "safetensors_b64"):
            raise RequestError(f"load_format {fmt!r} is not supported on CPU; send base64 safetensors buckets "
                               "(load_format 'safetensors_b64')")
        blobs = body.get("serialized_named_tensors")
        if not isinstance(blobs, list) or not all(isinstance(b, str) for b in blobs):
            raise RequestError("serialized_named_tensors must be a list of base64 strings")
        try:
            buckets = [decode_bucket(b) for b in blobs]
        except Exception as err:  # noqa: BLE001 - any decoding failure is a bad request
            raise RequestError(f"serialized_named_tensors: not base64 safetensors ({err})") from None
        return json_response(await self.update(buckets, body.get("weight_version"),
                                               bool(body.get("abort_all_requests"))))

    @route("POST", "/update_weight_version")
    async def update_weight_version(self, request):
        body = await read_body(request)
        if body.get("abort_all_requests", True):
            self.engine.abort()
        return json_response(await self.update([], body.get("new_version"), False))

    @route("POST", "/init_weights_update_group", "/update_weights_from_distributed")
    async def no_nccl(self, request):
        return error_response(400, f"{request.path}: NCCL weight transfer needs GPUs and a real SGLang server; "
                                   "the embedded CPU server takes update_weights_from_disk/_from_tensor")

    @route("*", "/flush_cache")
    async def flush_cache(self, request):
        return json_response({"success": True, "message": "ok"})

    @route("POST", "/pause_generation")
    async def pause_generation(self, request):
        body = await read_body(request)
        mode = body.get("mode", "abort")
        self.engine.pause("wait" if mode in ("in_place", "retract", "wait") else "abort")
        return json_response({"success": True, "message": f"paused ({mode})"})

    @route("POST", "/continue_generation")
    async def continue_generation(self, request):
        self.engine.resume()
        return json_response({"success": True, "message": "resumed"})

    @route("POST", "/abort_request")
    async def abort_request(self, request):
        body = await read_body(request)
        n = self.engine.abort(None if body.get("abort_all") else body.get("rid"))
        return json_response({"success": True, "message": f"aborted {n}"})

    @route("POST", "/release_memory_occupation")
    async def release_memory(self, request):
        # CPU: nothing is freed (the weights stay resident); generation is refused until resumed, which
        # is the contract callers rely on (they resync weights after resuming).
        self.engine.pause("abort")
        self.state.released = True
        return json_response({"success": True, "message": "released (CPU: nothing freed, generation refused)"})

    @route("POST", "/resume_memory_occupation")
    async def resume_memory(self, request):
        self.state.released = False
        self.engine.resume()
        return json_response({"success": True, "message": "resumed"})

    @route("*", "/health", "/health_generate")
    async def health(self, request):
        if not self.engine.health():
            return error_response(503, "engine unhealthy")
        return json_response({"status": "ok"})

    @route("GET", "/get_server_info")
    async def server_info(self, request):
        e = self.engine
        return json_response({"model_path": e.model_dir, "served_model_name": self.state.served_model_name,
                              "weight_version": str(e.weight_version), "context_length": e.max_context,
                              "vocab_size": e.vocab_size, "max_batch": e.max_batch, "paused": e.paused,
                              "released": self.state.released, "tokens_generated": e.tokens_generated,
                              "engine": "embedded"})

    @route("GET", "/get_model_info")
    async def model_info(self, request):
        return json_response({"model_path": self.engine.model_dir, "is_generation": True,
                              "weight_version": str(self.engine.weight_version)})
