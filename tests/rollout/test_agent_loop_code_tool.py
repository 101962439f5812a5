"""SandboxFusionTool against a fake /run_code server: request JSON, text rule, failures as tool errors."""

from __future__ import annotations

import asyncio

from aiohttp import web

from megatron_spo.rollout.agent_loop import AgentLoopConfig, call_tool
from megatron_spo.rollout.code_tool import SandboxFusionTool
from megatron_spo.rollout.sample import Sample


async def with_server(handler, body):
    app = web.Application()
    app.router.add_post("/run_code", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_request_shape_and_text_rule():
    seen = []

    async def handler(request):
        body = await request.json()
        seen.append(body)
        if "fail" in body["code"]:
            return web.json_response({"status": "Failed", "message": "", "compile_result": None,
                                      "run_result": {"status": "TimeLimitExceeded", "execution_time": 30.0,
                                                     "return_code": None, "stdout": "partial", "stderr": ""}})
        return web.json_response({"status": "Success", "message": "", "compile_result": None,
                                  "run_result": {"status": "Finished", "execution_time": 0.01, "return_code": 0,
                                                 "stdout": "42\n", "stderr": "warn\n"}})

    async def body(url):
        tool = SandboxFusionTool(url, run_timeout=7, memory_limit_mb=512)
        try:
            return await tool.run("print(6 * 7)"), await tool.run("fail()")
        finally:
            await tool.aclose()

    ok, bad = asyncio.run(with_server(handler, body))
    assert ok == "42\nwarn\n"                    # stdout + stderr when Finished
    assert bad == "no stdout here"               # anything else
    assert seen[0]["code"] == "print(6 * 7)" and seen[0]["language"] == "python"
    assert seen[0]["run_timeout"] == 7 and seen[0]["memory_limit_MB"] == 512
    assert seen[0]["files"] == {} and seen[0]["fetch_files"] == []


def test_server_error_becomes_counted_tool_error_text():
    async def handler(request):
        return web.Response(status=400, text="bad request: language")

    async def body(url):
        tool = SandboxFusionTool(url, max_attempts=1)
        s = Sample(uid="s/0", request_uid="s")
        try:
            text = await call_tool(lambda: tool.run("print(1)"), AgentLoopConfig().tool_timeout_s, s)
        finally:
            await tool.aclose()
        return text, s

    text, s = asyncio.run(with_server(handler, body))
    assert text.startswith("Error when executing tool: POST /run_code answered HTTP 400: bad request: language")
    assert s.metrics == {"tool_calls": 1, "tool_errors": 1}
