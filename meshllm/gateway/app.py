"""The gateway's ASGI app (Starlette) and its server (uvicorn): OpenAI's HTTP API in front of a mesh.

Every completion goes to the mesh through one shared
:class:`meshllm.serve.client.Client`, the same client ``meshllm ask`` uses; the
mesh's state (for ``/v1/models``, the readiness check and the mesh page) comes
from a :class:`~meshllm.gateway.meshview.MeshWatcher`. :class:`Upstream` owns
both connections and re-opens them when the broker goes away (a mesh can move
its broker to another node).

A completion is an ASGI response (:class:`_CompletionResponse`) that listens
for the HTTP client's disconnect while it waits on the mesh: when the client
goes, the mesh request is cancelled (the client's stream is closed, which
publishes the cancel). A streamed answer's status line waits for the mesh's
first reply, so that ``busy``, ``unavailable`` and refusals get their own
status (429, 503, 400) rather than a 200 followed by an error event.

This module owns HTTP; the translation to and from OpenAI's JSON lives in
:mod:`meshllm.gateway.openai_api`, and must not know about MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiomqtt
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from meshllm.aio import stop_task
from meshllm.errors import MeshError
from meshllm.gateway import openai_api as oa
from meshllm.gateway.meshview import MeshView, MeshWatcher, ModelInfo
from meshllm.mesh.access import with_login
from meshllm.mesh.broker import BrokerError, BrokerURL
from meshllm.mesh.status import find_broker
from meshllm.serve.client import Client, RequestFailed

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


@dataclass(frozen=True)
class GatewayConfig:
    """What a gateway serves and how it reaches the mesh.

    ``broker``: a URL, a function returning the current URL (a node passes its
    own view of the mesh's broker), or None to find the mesh's broker over mDNS
    like ``meshllm ask``. ``api_key``: when set, ``/v1/*`` needs
    ``Authorization: Bearer <api_key>``. ``model_dir``: a model directory whose
    manifest names the model and its context (optional; the mesh's retained
    records say it otherwise).
    """

    mesh: str = "meshllm"
    broker: str | Callable[[], str | None] | None = None
    interface: str | None = None
    ca_file: str | None = None
    api_key: str | None = None
    model_dir: str | None = None
    login: tuple[str, str] | None = None  # (user, password) for a broker URL without one (a mesh with a secret)
    chat_template: str | None = None  # a Jinja file (--chat-template): chats rendered here with it, not the mesh's
    first_token_timeout: float = 120.0
    idle_timeout: float = 30.0
    discovery_timeout: float = 5.0


def model_from_dir(model_dir: str) -> ModelInfo:
    from meshllm.model.manifest import load_manifest

    m = load_manifest(model_dir)
    return ModelInfo(m.name, m.config.max_seq_len, frozenset({os.path.basename(os.path.normpath(model_dir))}))


# --- the mesh side --------------------------------------------------------------


class Upstream:
    """The gateway's two connections to the mesh's broker (requests and state), kept open.

    :meth:`run` connects, serves until a connection is lost (or :meth:`reconnect`
    is called after a request saw the broker fail), and connects again, finding
    the broker anew each time. Meanwhile :attr:`client` is None and requests get 503.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.view = MeshView(config.mesh, model_override=model_from_dir(config.model_dir) if config.model_dir
                             else None)
        self.client: Client | None = None
        self.closing = asyncio.Event()  # set when the server stops: answers in flight end now
        self._reconnect = asyncio.Event()
        self.last_error: str | None = "not connected yet"

    def reconnect(self) -> None:
        self._reconnect.set()

    async def _broker_url(self) -> str:
        b = self.config.broker
        if callable(b):
            url = b()
            if not url:
                raise BrokerError("the node has not found the mesh's broker yet")
            return url
        if b:
            return b
        return await find_broker(self.config.mesh, self.config.interface, self.config.discovery_timeout)

    async def run(self) -> None:
        cfg, backoff = self.config, 0.25
        while True:
            shown = "(no broker found yet)"
            try:
                url = with_login(await self._broker_url(), cfg.login)
                shown = str(BrokerURL.parse(url))  # without the password
                async with MeshWatcher(self.view, url, cfg.ca_file) as watcher, \
                        Client(cfg.mesh, url, cfg.interface, cfg.ca_file, first_token_timeout=cfg.first_token_timeout,
                               idle_timeout=cfg.idle_timeout) as client:
                    self.client, self.last_error, backoff = client, None, 0.25
                    self._reconnect.clear()
                    log.info("gateway connected to mesh %r via %s", cfg.mesh, client.broker_display)
                    await self._watch(watcher)
            except (MeshError, aiomqtt.MqttError, OSError) as e:
                self.last_error = f"{shown}: {e}"
                log.warning("gateway: mesh %r via %s: %s; reconnecting", cfg.mesh, shown, e)
            finally:
                self.client = None
                self.view.forget()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _watch(self, watcher: MeshWatcher) -> None:
        """Until the watcher's connection fails or a request reported the broker lost."""
        watch = asyncio.ensure_future(watcher.run())
        lost = asyncio.ensure_future(self._reconnect.wait())
        try:
            await asyncio.wait({watch, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (watch, lost):
                t.cancel()
            results = await asyncio.gather(watch, lost, return_exceptions=True)
        if isinstance(results[0], (aiomqtt.MqttError, MeshError)):
            raise results[0]
        if isinstance(results[0], Exception):  # a bug: say so, and start over
            log.error("gateway: the mesh watcher failed", exc_info=results[0])
        if lost.done() and not lost.cancelled():
            raise BrokerError("a request found the broker connection lost")

    def model(self) -> ModelInfo | None:
        return self.view.model()

    def check_available(self) -> Client:
        """The client to send with, or the 503 to answer now."""
        client = self.client
        if client is None:
            raise oa.unavailable(f"the gateway is not connected to mesh {self.config.mesh!r} "
                                 f"({self.last_error or 'connecting'}); try again shortly")
        reason = self.view.unavailable_reason()
        if reason is not None:
            raise oa.unavailable(f"{reason}; try again shortly")
        return client


# --- completions ----------------------------------------------------------------


class _CompletionResponse(Response):
    """Runs one mesh request and answers it, streamed or whole; cancels it if the HTTP client goes."""

    def __init__(self, upstream: Upstream, call: oa.MeshCall, model: ModelInfo) -> None:
        self.upstream, self.call, self.model = upstream, call, model
        self.rid = f"gw-{secrets.token_hex(8)}"
        self.created = int(time.time())
        self.status_code = 0  # the status sent, for the log
        self.sent_tokens = 0
        self._gone = False  # the HTTP client disconnected: stop reading the mesh's replies
        self._started = False  # the status line is sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.monotonic()
        work = asyncio.ensure_future(self._answer(send))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        closing = asyncio.ensure_future(self.upstream.closing.wait())
        try:
            await asyncio.wait({work, gone, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():  # the client went first, or the gateway is stopping: stop the mesh request
                why = "HTTP client disconnected" if gone.done() else "the gateway is shutting down"
                log.info("request %s: %s; cancelling it on the mesh", self.rid, why)
                self._gone = True
                while not work.done():
                    # again until it takes: on Python 3.11, asyncio.wait_for (inside the client) loses a
                    # cancellation that arrives as the awaited reply does (CPython gh-86296)
                    work.cancel()
                    await asyncio.wait({work}, timeout=0.05)
                if not gone.done():  # tell the client, who is still there
                    await self._end_early(send, oa.unavailable("the gateway is shutting down; try again shortly"))
            for t in (gone, closing):
                t.cancel()
            await asyncio.gather(work, gone, closing, return_exceptions=True)
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]  # a bug: let Starlette answer 500 and log it
        log.info("request %s: %s %s -> %s, %d tokens, %.3f s", self.rid, self.call.endpoint, self.call.model,
                 self.status_code or "disconnected", self.sent_tokens, time.monotonic() - t0)

    async def _end_early(self, send: Send, err: oa.APIError) -> None:
        with contextlib.suppress(OSError):
            if not self._started:
                await self._send_error(send, err)
            elif self.call.stream:
                await send({"type": "http.response.body", "body": oa.SSEEncoder.error(err), "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _answer(self, send: Send) -> None:
        try:
            client = self.upstream.check_available()
            stream = client.stream(**self.call.params, request_id=self.rid)
        except oa.APIError as e:
            await self._send_error(send, e)
            return
        except RequestFailed as e:  # refused before sending, by the mesh's own rules
            await self._send_error(send, oa.mesh_error(e.code, e.message))
            return
        async with contextlib.aclosing(stream) as chunks:
            if self.call.stream:
                await self._stream(send, chunks)
            else:
                await self._whole(send, chunks)

    async def _whole(self, send: Send, chunks: AsyncIterator[Any]) -> None:
        parts: list[str] = []
        try:
            async for c in chunks:
                if self._gone:
                    return
                parts.append(c.text)
                if c.done:
                    usage = oa.usage_json(c.usage.prompt_tokens, c.usage.completion_tokens)
                    self.sent_tokens = c.usage.completion_tokens
                    body = oa.response_json(self.call, self.rid, self.created, self.model.id, "".join(parts),
                                            c.finish_reason, usage)
                    await self._send_json(send, 200, body)
                    return
        except MeshError as e:
            await self._send_error(send, self._error(e))

    async def _stream(self, send: Send, chunks: AsyncIterator[Any]) -> None:
        enc = oa.SSEEncoder(self.call, self.rid, self.created, self.model.id)
        try:
            first = await anext(aiter(chunks))
        except MeshError as e:
            await self._send_error(send, self._error(e))
            return
        self.status_code, self._started = 200, True
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), (b"x-request-id", self.rid.encode())]})
        body = enc.start()
        c = first
        try:
            while True:
                if c.done:
                    out = body + enc.finish(c.finish_reason, c.text)
                    if self.call.include_usage:
                        out += enc.usage(oa.usage_json(c.usage.prompt_tokens, c.usage.completion_tokens))
                    self.sent_tokens = c.usage.completion_tokens
                    await send({"type": "http.response.body", "body": out + oa.DONE_EVENT, "more_body": False})
                    return
                if c.text:
                    body += enc.text(c.text)
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    body = b""
                c = await anext(chunks)
                if self._gone:
                    return
        except MeshError as e:  # after the status line: the error goes in the stream
            err = self._error(e)
            log.warning("request %s: failed mid-stream: %s", self.rid, err.message)
            await send({"type": "http.response.body", "body": body + enc.error(err), "more_body": False})

    def _error(self, e: MeshError) -> oa.APIError:
        if isinstance(e, RequestFailed):
            return oa.mesh_error(e.code, e.message)
        if isinstance(e, BrokerError):
            self.upstream.reconnect()
        return oa.unavailable(f"{e}; try again shortly")

    async def _send_error(self, send: Send, err: oa.APIError) -> None:
        if err.status >= 500:
            log.warning("request %s: %d %s", self.rid, err.status, err.message)
        await self._send_json(send, err.status, err.body(), err.headers())

    async def _send_json(self, send: Send, status: int, body: dict[str, Any],
                         headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        resp = JSONResponse(body, status, headers={**(headers or {}), "x-request-id": self.rid})
        self._started = True
        await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body, "more_body": False})


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# --- the app --------------------------------------------------------------------


def create_app(config: GatewayConfig) -> Starlette:
    """The gateway's ASGI app; its lifespan opens (and keeps open) the connections to the mesh."""
    upstream = Upstream(config)
    key = config.api_key.encode() if config.api_key else None
    template = None
    if config.chat_template is not None:
        from meshllm.model.tokenizer import read_chat_template

        template = read_chat_template(config.chat_template)  # a bad file: one line at start, not per request
    template_name = f"{os.path.basename(config.chat_template)} (--chat-template)" if config.chat_template else None

    def authorize(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise oa.APIError(401, "Incorrect API key provided. Pass the gateway's key as "
                              "'Authorization: Bearer <key>'.", code="invalid_api_key")

    def model_or_503() -> ModelInfo:
        m = upstream.model()
        if m is None:
            upstream.check_available()  # says why, when it knows
            raise oa.unavailable("the mesh has not said which model it serves yet; try again shortly")
        return m

    async def read_body(request: Request) -> bytes:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY_BYTES:
            raise oa.APIError(413, f"request body of {size} bytes exceeds {MAX_BODY_BYTES} bytes")
        parts, total = [], 0
        async for part in request.stream():
            total += len(part)
            if total > MAX_BODY_BYTES:
                raise oa.APIError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
            parts.append(part)
        return b"".join(parts)

    async def completion(request: Request, parse: Callable[[bytes], oa.MeshCall]) -> Response:
        authorize(request)
        call = parse(await read_body(request))  # bad input is a 400 whatever the mesh's state
        model = model_or_503()
        if not model.accepts(call.model):
            raise oa.APIError(404, f"The model '{call.model}' does not exist: this mesh serves '{model.id}' "
                              "(see GET /v1/models)", param="model", code="model_not_found")
        if template is not None:
            call = oa.with_chat_template(call, template)
        if call.params.get("max_tokens") is None and model.context_length:
            # OpenAI's default: as long as the context allows; the mesh stops when it is full
            call = dataclasses.replace(call, params={**call.params, "max_tokens": model.context_length})
        return _CompletionResponse(upstream, call, model)

    async def chat_completions(request: Request) -> Response:
        return await completion(request, oa.parse_chat)

    async def completions(request: Request) -> Response:
        return await completion(request, oa.parse_completion)

    def model_json(m: ModelInfo) -> dict[str, Any]:
        return {"id": m.id, "object": "model", "created": 0, "owned_by": f"meshllm:{config.mesh}",
                "context_length": m.context_length, "max_model_len": m.context_length,
                "chat_template": template_name or m.chat_template}

    async def models(request: Request) -> Response:
        authorize(request)
        m = upstream.model()
        return JSONResponse({"object": "list", "data": [model_json(m)] if m else []})

    async def one_model(request: Request) -> Response:
        authorize(request)
        m = upstream.model()
        name = request.path_params["model"]
        if m is None or not m.accepts(name):
            raise oa.APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(model_json(m))

    async def mesh_status(request: Request) -> Response:
        authorize(request)
        snap = upstream.view.snapshot(time.monotonic())
        snap["gateway"] = {"connected": upstream.client is not None, "error": upstream.last_error,
                           "auth": key is not None}
        return JSONResponse(snap, headers={"cache-control": "no-store"})

    async def index(request: Request) -> Response:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"cache-control": "no-cache"})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, oa.APIError)
        return JSONResponse(exc.body(), exc.status, headers=exc.headers())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        msg = (f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else
               f"Method {request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else
               str(exc.detail))
        return JSONResponse(oa.APIError(exc.status_code, msg).body(), exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        err = oa.APIError(500, f"the gateway failed: {type(exc).__name__}: {exc}", "server_error",
                          code="internal_error")
        return JSONResponse(err.body(), 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.ensure_future(upstream.run())
        try:
            yield
        finally:
            await stop_task(task)  # a lifespan cancelled meanwhile stays cancelled

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/v1/models/{model:path}", one_model),
            Route("/v1/mesh", mesh_status),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={oa.APIError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.upstream = upstream
    return app


# --- the server -------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process that runs it (``meshllm gateway``, or a node)
    owns SIGINT/SIGTERM and stops the gateway by cancelling :func:`serve_gateway`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_gateway(app_or_config: Starlette | GatewayConfig, host: str = "127.0.0.1", port: int = 8000, *,
                        started: Callable[[str], None] | None = None) -> None:
    """Serves the gateway on ``host:port`` until cancelled, then shuts down (streams get 2 s to end).

    ``started`` is called with the URL once the socket listens (``port=0`` picks a free one).
    """
    app = create_app(app_or_config) if isinstance(app_or_config, GatewayConfig) else app_or_config
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MeshError(f"the gateway cannot listen on {host}:{port}: {e.strerror or e}") from None
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                    lifespan="on", timeout_graceful_shutdown=2, server_header=False))
    url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{sock.getsockname()[1]}"
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise MeshError(f"the gateway on {url} stopped while starting")
            await asyncio.sleep(0.02)
        log.info("gateway for mesh listening on %s", url)
        if started is not None:
            started(url)
        await asyncio.shield(task)
    except asyncio.CancelledError:
        upstream = getattr(app.state, "upstream", None)
        if isinstance(upstream, Upstream):
            upstream.closing.set()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        raise
    finally:
        sock.close()
