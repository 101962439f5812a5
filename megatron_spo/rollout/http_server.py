"""Serve an :class:`EmbeddedEngine` over HTTP: the SGLang-native subset plus vLLM's completions/RL routes.

``python -m megatron_spo.rollout.http_server --model DIR --host 127.0.0.1 --port N`` (port 0 picks a
free port). Once listening it prints one line ``LISTENING http://HOST:PORT`` to stdout, which
supervisors (fleet.py) wait for.

SGLang-native routes (shapes in spec/engine_contracts.md §2): ``/generate`` (token ids only),
``/update_weights_from_disk``, ``/update_weights_from_tensor``, ``/update_weight_version``,
``/flush_cache``, ``/pause_generation``, ``/continue_generation``, ``/abort_request``,
``/release_memory_occupation``, ``/resume_memory_occupation``, ``/health``, ``/health_generate``,
``/get_server_info``, ``/get_model_info``.

``/update_weights_from_tensor`` on CPU: real SGLang expects ``MultiprocessingSerializer`` strings
(CUDA IPC handles, pickle inside). This server never unpickles: each string must be the base64 of
a safetensors file holding one bucket ``{hf_name: tensor}`` (``load_format: "safetensors_b64"``),
see :func:`encode_bucket`.

vLLM routes (so the vLLM client's contract test runs against the same engine): ``/v1/models``,
``/v1/completions`` (token-id prompts, ``logprobs``, ``token_ids``), ``/collective_rpc`` with the
methods of :class:`megatron_spo.rollout.vllm_worker_ext.WorkerExtension`, ``/pause``, ``/resume``,
``/is_paused``, ``/sleep``, ``/wake_up``, ``/is_sleeping``, ``/reset_prefix_cache``.

Error statuses: 400 for a request no engine can serve (JSON ``{"error": {"message": ...}}`` naming
the item; the clients raise :class:`RequestError`), 503 while memory is released, 500 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import uuid
from typing import Any, Dict, List, Optional

from megatron_spo.rollout.engine import GenerateResult, RequestError, SamplingParams

# SGLang sampling keys that do not change what this engine computes (stop strings are always kept
# in the output and special tokens are never skipped, since only ids are returned).
_SGLANG_IGNORED = {"skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens", "n",
                   "min_new_tokens", "frequency_penalty", "presence_penalty", "repetition_penalty"}
_SGLANG_MAPPED = {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
                  "ignore_eos", "seed", "sampling_seed"}
_VLLM_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
              "stop_token_ids", "logprobs", "return_tokens_as_token_ids", "return_token_ids",
              "include_stop_str_in_output", "skip_special_tokens", "ignore_eos", "n", "stream", "request_id"}


def encode_bucket(bucket) -> str:
    """``[(hf_name, tensor)]`` -> base64 safetensors string for ``/update_weights_from_tensor``."""
    from safetensors.torch import save

    return base64.b64encode(save({n: t.detach().contiguous().cpu() for n, t in bucket})).decode("ascii")


def decode_bucket(text: str):
    """Inverse of :func:`encode_bucket`: a list of ``(hf_name, tensor)``; never unpickles."""
    from safetensors.torch import load

    return list(load(base64.b64decode(text.encode("ascii"), validate=True)).items())


def _sampling_from_sglang(sp: Dict[str, Any]) -> SamplingParams:
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


def _sglang_item(res: GenerateResult, rid: str, want_logprob: bool, tokenizer) -> Dict[str, Any]:
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


class EngineServer:
    """The aiohttp application around one engine (an :class:`EmbeddedEngine`)."""

    def __init__(self, engine, served_model_name: Optional[str] = None):
        self.engine = engine
        self.served_model_name = served_model_name or engine.model_dir
        self.released = False
        self.sleeping = False

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=1024 ** 3, middlewares=[self._errors])
        r = app.router
        r.add_post("/generate", self.generate)
        r.add_post("/update_weights_from_disk", self.update_from_disk)
        r.add_post("/update_weights_from_tensor", self.update_from_tensor)
        r.add_post("/update_weight_version", self.update_weight_version)
        r.add_post("/init_weights_update_group", self.no_nccl)
        r.add_post("/update_weights_from_distributed", self.no_nccl)
        r.add_route("*", "/flush_cache", self.ok)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/release_memory_occupation", self.release_memory)
        r.add_post("/resume_memory_occupation", self.resume_memory)
        r.add_route("*", "/health", self.health)
        r.add_route("*", "/health_generate", self.health)
        r.add_get("/get_server_info", self.server_info)
        r.add_get("/get_model_info", self.model_info)
        # vLLM subset
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/collective_rpc", self.collective_rpc)
        r.add_post("/pause", self.vllm_pause)
        r.add_post("/resume", self.vllm_resume)
        r.add_get("/is_paused", self.is_paused)
        r.add_post("/sleep", self.sleep)
        r.add_post("/wake_up", self.wake_up)
        r.add_get("/is_sleeping", self.is_sleeping)
        r.add_post("/reset_prefix_cache", self.ok)
        return app

    # ------------------------------------------------------------------------------- helpers

    @staticmethod
    def _json(data: Any, status: int = 200):
        from aiohttp import web

        return web.json_response(data, status=status)

    def _error(self, status: int, message: str):
        return self._json({"error": {"message": message, "code": status}, "success": False, "message": message},
                          status)

    @property
    def _errors(self):
        from aiohttp import web

        @web.middleware
        async def middleware(request, handler):
            try:
                return await handler(request)
            except web.HTTPException:
                raise
            except (RequestError, ValueError, KeyError, TypeError, FileNotFoundError) as err:
                return self._error(400, f"{request.path}: {err}")
            except Exception as err:  # noqa: BLE001 - reported to the client, server keeps running
                return self._error(500, f"{request.path}: {type(err).__name__}: {err}")
        return middleware

    @staticmethod
    async def _body(request) -> Dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError as err:
            raise RequestError(f"body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(f"body must be a JSON object, got {type(body).__name__}")
        return body

    def _check_awake(self) -> None:
        if self.released or self.sleeping:
            from aiohttp import web

            raise web.HTTPServiceUnavailable(text="memory released / sleeping: call resume_memory_occupation / wake_up")

    async def _run(self, prompts: List[List[int]], sampling: SamplingParams, rids: List[str]) -> List[GenerateResult]:
        reqs = [self.engine.make_request(p, sampling, rid) for p, rid in zip(prompts, rids)]  # validate all first
        futs = [asyncio.wrap_future(self.engine.submit(r)) for r in reqs]
        try:
            return list(await asyncio.gather(*futs))
        except asyncio.CancelledError:  # client went away: stop decoding its rows
            for r in reqs:
                r.aborted = True
            raise

    @staticmethod
    def _prompts(value: Any, key: str) -> List[List[int]]:
        if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
            return [value]
        if isinstance(value, list) and value and all(isinstance(p, list) for p in value):
            return value
        raise RequestError(f"{key} must be a non-empty list of token ids or a list of such lists")

    async def _update(self, source, version: Any, abort: bool) -> Dict[str, Any]:
        v = self.engine.weight_version + 1 if version is None else int(version)
        n = await asyncio.to_thread(self.engine.update_weights, source, v, abort_in_flight=abort)
        return {"success": True, "message": f"loaded {n} tensors, weight_version {v}", "num_paused_requests": 0,
                "weight_version": str(v)}

    # ----------------------------------------------------------------------------- SGLang routes

    async def generate(self, request):
        self._check_awake()
        body = await self._body(request)
        if body.get("stream"):
            raise RequestError("stream=true is not supported by the embedded server")
        if "input_ids" not in body:
            raise RequestError("input_ids is required (token ids in, token ids out; text prompts are not accepted)")
        single = bool(body["input_ids"]) and all(isinstance(t, int) for t in body["input_ids"])
        prompts = self._prompts(body["input_ids"], "input_ids")
        rid = body.get("rid")
        if rid is None:
            rids = [uuid.uuid4().hex for _ in prompts]
        elif isinstance(rid, str):
            rids = [rid] if single else [f"{rid}-{i}" for i in range(len(prompts))]
        else:
            rids = [str(x) for x in rid]
        sampling = _sampling_from_sglang(body.get("sampling_params", {}))
        results = await self._run(prompts, sampling, rids)
        items = [_sglang_item(r, rid, bool(body.get("return_logprob")), self.engine.tokenizer)
                 for r, rid in zip(results, rids)]
        return self._json(items[0] if single else items)

    async def update_from_disk(self, request):
        body = await self._body(request)
        if not body.get("model_path"):
            raise RequestError("model_path is required")
        return self._json(await self._update(body["model_path"], body.get("weight_version"),
                                             bool(body.get("abort_all_requests"))))

    async def update_from_tensor(self, request):
        body = await self._body(request)
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
        return self._json(await self._update(buckets, body.get("weight_version"),
                                             bool(body.get("abort_all_requests"))))

    async def update_weight_version(self, request):
        body = await self._body(request)
        if body.get("abort_all_requests", True):
            self.engine.abort()
        return self._json(await self._update([], body.get("new_version"), False))

    async def no_nccl(self, request):
        return self._error(400, f"{request.path}: NCCL weight transfer needs GPUs and a real SGLang server; "
                                "the embedded CPU server takes update_weights_from_disk/_from_tensor")

    async def ok(self, request):
        return self._json({"success": True, "message": "ok"})

    async def pause_generation(self, request):
        body = await self._body(request)
        mode = body.get("mode", "abort")
        self.engine.pause("wait" if mode in ("in_place", "retract", "wait") else "abort")
        return self._json({"success": True, "message": f"paused ({mode})"})

    async def continue_generation(self, request):
        self.engine.resume()
        return self._json({"success": True, "message": "resumed"})

    async def abort_request(self, request):
        body = await self._body(request)
        n = self.engine.abort(None if body.get("abort_all") else body.get("rid"))
        return self._json({"success": True, "message": f"aborted {n}"})

    async def release_memory(self, request):
        # CPU: nothing is freed (the weights stay resident); generation is refused until resumed, which
        # is the contract callers rely on (they resync weights after resuming).
        self.engine.pause("abort")
        self.released = True
        return self._json({"success": True, "message": "released (CPU: nothing freed, generation refused)"})

    async def resume_memory(self, request):
        self.released = False
        self.engine.resume()
        return self._json({"success": True, "message": "resumed"})

    async def health(self, request):
        if not self.engine.health():
            return self._error(503, "engine unhealthy")
        return self._json({"status": "ok"})

    async def server_info(self, request):
        e = self.engine
        return self._json({"model_path": e.model_dir, "served_model_name": self.served_model_name,
                           "weight_version": str(e.weight_version), "context_length": e.max_context,
                           "vocab_size": e.vocab_size, "max_batch": e.max_batch, "paused": e.paused,
                           "released": self.released, "tokens_generated": e.tokens_generated, "engine": "embedded"})

    async def model_info(self, request):
        return self._json({"model_path": self.engine.model_dir, "is_generation": True,
                           "weight_version": str(self.engine.weight_version)})

    # ------------------------------------------------------------------------------- vLLM routes

    async def models(self, request):
        return self._json({"object": "list", "data": [{"id": self.served_model_name, "object": "model",
                                                        "max_model_len": self.engine.max_context}]})

    async def completions(self, request):
        self._check_awake()
        body = await self._body(request)
        unknown = sorted(set(body) - _VLLM_KEYS)
        if unknown:
            raise RequestError(f"unsupported key(s) {unknown}")
        if body.get("stream"):
            raise RequestError("stream=true is not supported by the embedded server")
        if body.get("n", 1) != 1:
            raise RequestError(f"n must be 1, got {body['n']!r}")
        if body.get("include_stop_str_in_output", True) is False:
            raise RequestError("include_stop_str_in_output=false is not supported: stop strings stay in the output")
        prompts = self._prompts(body.get("prompt"), "prompt")
        stop = body.get("stop") or ()
        sampling = SamplingParams(
            max_new_tokens=int(body.get("max_tokens", 16)), temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", -1) or -1),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(body.get("stop_token_ids") or ()), ignore_eos=bool(body.get("ignore_eos", False)),
            seed=None if body.get("seed") is None else int(body["seed"]))
        base = str(body.get("request_id") or uuid.uuid4().hex)
        results = await self._run(prompts, sampling, [f"{base}-{i}" for i in range(len(prompts))])
        tok = self.engine.tokenizer
        choices = []
        for i, (p, res) in enumerate(zip(prompts, results)):
            matched = res.meta.get("matched") if res.finish_reason == "stop" else None
            choice = {"index": i, "text": tok.decode(res.token_ids, skip_special_tokens=False) if tok else "",
                      "finish_reason": res.finish_reason, "stop_reason": matched,
                      "token_ids": list(res.token_ids), "prompt_token_ids": list(p), "logprobs": None}
            if body.get("logprobs") is not None:
                choice["logprobs"] = {"token_logprobs": list(res.logprobs),
                                      "tokens": [f"token_id:{t}" for t in res.token_ids],
                                      "top_logprobs": None, "text_offset": []}
            choices.append(choice)
        n_out = sum(len(r.token_ids) for r in results)
        n_in = sum(len(p) for p in prompts)
        return self._json({"id": f"cmpl-{base}", "object": "text_completion", "model": self.served_model_name,
                           "choices": choices, "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                                         "total_tokens": n_in + n_out}})

    async def collective_rpc(self, request):
        from megatron_spo.rollout.vllm_worker_ext import RPC_METHODS

        body = await self._body(request)
        method = body.get("method")
        if method not in RPC_METHODS:
            raise RequestError(f"collective_rpc: unknown method {method!r}; known: {sorted(RPC_METHODS)}")
        args = body.get("args") or []
        if not all(isinstance(a, str) for a in args):
            raise RequestError("collective_rpc: args must be strings")
        if method == "update_weights_from_disk":
            path, version = (list(args) + [None, None])[:2]
            out = await self._update(path, version, False)
            return self._json({"results": [out["weight_version"]]})
        return self._json({"results": [str(self.engine.weight_version)]})

    async def vllm_pause(self, request):
        mode = request.query.get("mode", "abort")
        self.engine.pause("abort" if mode == "abort" else "wait")
        return self._json({"status": "paused"})

    async def vllm_resume(self, request):
        self.engine.resume()
        return self._json({"status": "resumed"})

    async def is_paused(self, request):
        return self._json({"is_paused": self.engine.paused})

    async def sleep(self, request):
        self.engine.pause("abort")
        self.sleeping = True
        return self._json({"status": "sleeping", "level": int(request.query.get("level", 1))})

    async def wake_up(self, request):
        self.sleeping = False
        self.engine.resume()
        return self._json({"status": "awake", "tags": request.query.getall("tags", None)})

    async def is_sleeping(self, request):
        return self._json({"is_sleeping": self.sleeping})


async def serve(engine, host: str = "127.0.0.1", port: int = 0, served_model_name: Optional[str] = None):
    """Start serving; returns ``(runner, url)`` (call ``await runner.cleanup()`` to stop)."""
    from aiohttp import web

    runner = web.AppRunner(EngineServer(engine, served_model_name).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # the real port when port=0
    return runner, f"http://{host}:{bound}"


class ServerThread:
    """Serve an engine from a background thread (tests, single-process demos); a context manager.

    ``with ServerThread(engine) as url: ...`` — the server stops on exit.
    """

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 0):
        import threading

        self.engine, self.host, self.port = engine, host, port
        self.url: Optional[str] = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-http", daemon=True)
        self._runner = None

    def start(self) -> str:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(serve(self.engine, self.host, self.port), self._loop)
        self._runner, self.url = fut.result(timeout=30)
        return self.url

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = any free port)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--served-model-name", default=None)


def run(args) -> int:
    from megatron_spo.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine(args.model, seed=args.seed, max_batch=args.max_batch)

    async def forever():
        runner, url = await serve(engine, args.host, args.port, args.served_model_name)
        print(f"LISTENING {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(forever())
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
    return 0


def register(subparsers) -> None:
    """``megatron-spo serve``: the embedded engine as an SGLang/vLLM-compatible HTTP server."""
    p = subparsers.add_parser("serve", help="serve a model with the embedded CPU engine over HTTP")
    add_arguments(p)
    p.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit(main())
