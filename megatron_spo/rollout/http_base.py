"""Shared HTTP plumbing of the SGLang and vLLM clients: timeouts, retries with backoff, clear errors.

Every call has a timeout. Failures a retry may fix (connection refused/reset, timeouts of control
calls, 5xx, a body that is not the JSON we expect) are retried ``retries`` times with exponential
backoff, then raised as :class:`EngineError` naming the URL; a 4xx is the request's fault and is
raised at once as :class:`RequestError` with the server's message. Nothing waits forever.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from typing import Any, Callable, Dict, Optional

from megatron_spo.rollout.engine import EngineError, RequestError


class _Retryable(Exception):
    pass


class HttpEngineClient:
    """Base of the HTTP engine clients.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:30000``.
        timeout_s: total timeout of one generation request (seconds).
        control_timeout_s: timeout of control calls (health, pause, weight updates: these may load a
            checkpoint, so not tiny).
        connect_timeout_s: TCP connect timeout.
        retries: extra attempts after the first for retryable failures.
        backoff_s: first backoff; doubles per attempt, capped at 8 s.
    """

    name = "http"

    def __init__(self, url: str, *, timeout_s: float = 600.0, control_timeout_s: float = 120.0,
                 connect_timeout_s: float = 5.0, retries: int = 2, backoff_s: float = 0.2):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"engine url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.control_timeout_s = float(control_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self._sync = httpx.Client(timeout=self._timeout(self.control_timeout_s))
        self._async: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._version = 0

    def _timeout(self, total: float):
        import httpx

        return httpx.Timeout(total, connect=min(self.connect_timeout_s, total))

    def _aclient(self):
        import httpx

        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._async.get(loop)
            if client is None:
                client = httpx.AsyncClient(timeout=self._timeout(self.control_timeout_s),
                                           limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
                self._async[loop] = client
            return client

    @property
    def weight_version(self) -> int:
        return self._version

    # ---------------------------------------------------------------------------------- calls

    def _check(self, method: str, path: str, resp, parse: Optional[Callable[[Any], Any]]) -> Any:
        where = f"{method} {self.url}{path}"
        if 400 <= resp.status_code < 500:
            raise RequestError(f"{where}: HTTP {resp.status_code}: {self._message(resp)}")
        if resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code}: {self._message(resp)}")
        try:
            data = resp.json() if resp.content else {}
        except (json.JSONDecodeError, ValueError):
            raise _Retryable(f"answer is not JSON: {resp.text[:200]!r}") from None
        if parse is None:
            return data
        try:
            return parse(data)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise _Retryable(f"unexpected answer ({type(err).__name__}: {err}): {str(data)[:200]!r}") from None

    @staticmethod
    def _message(resp) -> str:
        try:
            body = resp.json()
            if isinstance(body, dict):
                err = body.get("error")
                if isinstance(err, dict) and "message" in err:
                    return str(err["message"])
                if isinstance(err, str):
                    return err
                if "message" in body:
                    return str(body["message"])
                if "detail" in body:
                    return str(body["detail"])
        except ValueError:
            pass
        return resp.text[:300]

    def _fail(self, method: str, path: str, attempts: int, reason: str) -> EngineError:
        return EngineError(f"{method} {self.url}{path}: {reason} (after {attempts} attempt(s))")

    def _retry_excs(self):
        import httpx

        return (httpx.TransportError,)

    def request(self, method: str, path: str, body: Optional[Dict[str, Any]] = None, *,
                params: Optional[Dict[str, Any]] = None, timeout_s: Optional[float] = None,
                parse: Optional[Callable[[Any], Any]] = None, retries: Optional[int] = None) -> Any:
        """Blocking call; returns ``parse(json)`` (or the JSON). See the module doc for errors."""
        import httpx

        retries = self.retries if retries is None else retries
        reason = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 8.0))
            try:
                resp = self._sync.request(method, self.url + path, json=body, params=params,
                                          timeout=self._timeout(timeout_s or self.control_timeout_s))
                return self._check(method, path, resp, parse)
            except (_Retryable, httpx.TransportError) as err:  # TimeoutException is a TransportError
                reason = self._retry_reason(err, timeout_s)
        raise self._fail(method, path, retries + 1, reason)

    def _retry_reason(self, err: Exception, timeout_s: Optional[float]) -> str:
        """Why an attempt failed, for the final error message (retryable failures only)."""
        import httpx

        if isinstance(err, httpx.TimeoutException):
            return f"timed out after {timeout_s or self.control_timeout_s} s ({type(err).__name__})"
        if isinstance(err, httpx.TransportError):
            return f"unreachable ({type(err).__name__}: {err})"
        return str(err)

    async def arequest(self, method: str, path: str, body: Optional[Dict[str, Any]] = None, *,
                       params: Optional[Dict[str, Any]] = None, timeout_s: Optional[float] = None,
                       parse: Optional[Callable[[Any], Any]] = None, retries: Optional[int] = None) -> Any:
        """Async twin of :meth:`request`."""
        import httpx

        retries = self.retries if retries is None else retries
        client = self._aclient()
        reason = ""
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), 8.0))
            try:
                resp = await client.request(method, self.url + path, json=body, params=params,
                                            timeout=self._timeout(timeout_s or self.control_timeout_s))
                return self._check(method, path, resp, parse)
            except (_Retryable, httpx.TransportError) as err:
                reason = self._retry_reason(err, timeout_s)
        raise self._fail(method, path, retries + 1, reason)

    def health(self) -> bool:
        """One quick ``GET /health`` (no retries): True on 200."""
        try:
            self.request("GET", "/health", timeout_s=min(5.0, self.control_timeout_s), retries=0)
            return True
        except (EngineError, RequestError):
            return False

    async def ahealth(self) -> bool:
        try:
            await self.arequest("GET", "/health", timeout_s=min(5.0, self.control_timeout_s), retries=0)
            return True
        except (EngineError, RequestError):
            return False

    def close(self) -> None:
        self._sync.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
