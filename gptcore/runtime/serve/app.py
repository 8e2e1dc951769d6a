"""`gptcore serve`: an HTTP API over a language model, a chat model and/or a classifier (FastAPI +
uvicorn, no torch).

    POST /v1/generate  {prompt, max_new_tokens, temperature, top_k, top_p, seed, stream}
    POST /v1/classify  {texts: [...]}
    POST /v1/chat/completions  POST /v1/completions  GET /v1/models   OpenAI-compatible (openai_api.py)
    GET  /healthz (alive)  /readyz (models loaded, which versions)  /metrics (Prometheus text)

Every path but /healthz and /readyz needs `Authorization: Bearer $GPTCORE_SERVE_TOKEN`; without a
token the server binds only to loopback and refuses what a browser's page could send it (access.py),
and uvicorn runs with deadlines on slow and stalled connections (connections.py). Every request is
bounded before it costs anything: its body size, its fields (pydantic, each limit named in the
422), the prompt's tokens, then a slot (the rest get 429 at once). Generations decode through each
model's engine (`--batching continuous`: up to max_running sequences in one batch, max_queue more
waiting for a row) or alone on a model thread (`--batching per-request`: max_concurrency at once,
max_queue waiting), classification on a model thread. Models load after the server binds (/readyz
says 503 until then); a `models:/NAME@ALIAS` model follows its alias.
"""

# No `from __future__ import annotations`: FastAPI reads the request models (defined in
# create_app, from the limits) from the endpoints' annotations at runtime.

import asyncio
import ipaddress
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gptcore.errors import ConfigError, GptcoreError
from gptcore.runtime.engine import EngineLimits
from gptcore.runtime.serve.access import AccessControl, bearer_matches, route_path
from gptcore.runtime.serve.admission import Admission, BodyLimit, Overloaded
from gptcore.runtime.serve.limits import ServeConfig, ServeLimits
from gptcore.runtime.serve.metrics import Instrument, ServerMetrics
from gptcore.runtime.serve.models import ServedModels, follows_alias
from gptcore.runtime.serve.openai_api import add_openai_api
from gptcore.runtime.serve.requests import (
    INTERNAL_ERROR,
    OPENAI_PATHS,
    field_error,
    invalid,
    refusal,
    request_models,
)
from gptcore.runtime.stop import Decoded, decoded_text

log = logging.getLogger("gptcore.serve")

TOKEN_ENV = "GPTCORE_SERVE_TOKEN"
MIN_PUBLIC_TOKEN_CHARS = 32  # a token guarding a non-loopback bind: e.g. `openssl rand -hex 24` (48)
ENDPOINTS = {"/v1/generate", "/v1/classify", *OPENAI_PATHS, "/healthz", "/readyz", "/metrics"}


def load_function(config: ServeConfig) -> Callable[[str], Any]:
    from gptcore.runtime import load_model

    return partial(
        load_model,
        device=config.device,
        threads=config.threads,
        variant=config.variant,
        tracking_uri=config.tracking_uri,
        registry_uri=config.registry_uri,
    )


def create_app(
    config: ServeConfig,
    token: str | None = None,
    models: ServedModels | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app; its models load in the background once it starts (`on_load_failure(message)` if they cannot)."""
    limits = config.limits
    metrics = ServerMetrics()
    continuous = config.batching == "continuous"
    engine_limits = EngineLimits(limits.max_running, limits.max_running + limits.max_queue, limits.kv_tokens)
    models = models or ServedModels(
        config.models,
        load_function(config),
        config.tracking_uri,
        config.registry_uri,
        engine_limits if continuous else None,
        metrics,
    )
    admission = Admission(limits.max_concurrency, limits.max_queue)
    # An engine's requests only wait for tokens on their threads: as many as it runs and queues.
    generation = Admission(limits.max_running + limits.max_queue, 0) if continuous else admission
    metrics.watch(admission, generation)
    state = {"ready": False, "error": None}
    GenerateRequest, ClassifyRequest = request_models(limits)

    async def load_then_follow_aliases() -> None:
        try:
            await asyncio.to_thread(models.load_all)
        except Exception as e:  # an unreadable package, an unknown alias, two LMs: the server cannot serve
            state["error"] = str(e) if isinstance(e, GptcoreError) else f"{type(e).__name__}: {e}"
            log.error("serve: cannot load the models: %s", state["error"])
            if on_load_failure is not None:
                on_load_failure(state["error"])
            return
        state["ready"] = True
        if config.reload_interval > 0 and any(follows_alias(uri) for uri in config.models):
            while True:
                await asyncio.sleep(config.reload_interval)
                for outcome in await asyncio.to_thread(models.refresh):
                    metrics.reloads.labels(outcome).inc()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(load_then_follow_aliases())
        yield
        task.cancel()
        models.close()
        for slots in {admission, generation}:
            slots.shutdown()

    app = FastAPI(title="gptcore", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models, app.state.metrics, app.state.load_state = models, metrics, state
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(AccessControl, token=token)
    app.add_middleware(Instrument, metrics=metrics, endpoints=ENDPOINTS)  # outermost: counts 401s and 413s too

    @app.exception_handler(RequestValidationError)
    async def validation_failed(request, exc: RequestValidationError) -> JSONResponse:
        return invalid([field_error(e) for e in exc.errors()])

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException) -> JSONResponse:
        return refusal(route_path(request.scope), exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(request, exc: Overloaded) -> JSONResponse:
        return refusal(route_path(request.scope), 429, str(exc), {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def failed(request, exc: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return refusal(route_path(request.scope), 500, INTERNAL_ERROR)

    def served(kind: str):
        if not state["ready"]:
            raise HTTPException(
                503,
                "the models are still loading"
                if state["error"] is None
                else f"the models failed to load: {state['error']}",
            )
        model = models.get(kind)
        if model is None:
            raise HTTPException(
                404,
                f"no {'language model' if kind == 'lm' else 'classifier'} is served here "
                f"(serving: {', '.join(m['kind'] for m in models.describe())})",
            )
        return model

    add_openai_api(app, models, generation, metrics, limits, state)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        # Open to probes: the load error and the models' URIs (paths, registry names) only with the token.
        detailed = token is None or bearer_matches(request.scope, token.encode())
        if not state["ready"]:
            error = state["error"] if detailed or state["error"] is None else "the models failed to load (see the log)"
            return JSONResponse({"ready": False, "error": error}, status_code=503)
        described = models.describe()
        if not detailed:
            described = [{k: v for k, v in m.items() if k not in ("uri", "name")} for m in described]
        return JSONResponse({"ready": True, "models": described})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/generate")
    async def generate(request: GenerateRequest) -> Response:
        lm = served("lm")
        prompt_ids = lm.model.encode(request.prompt)
        if len(prompt_ids) > limits.max_prompt_tokens:
            return invalid(
                [
                    {
                        "field": "prompt",
                        "message": f"{len(prompt_ids)} tokens; at most "
                        f"{limits.max_prompt_tokens} (--max-prompt-tokens)",
                    }
                ]
            )
        sampling = (request.max_new_tokens, request.temperature, request.top_k, request.top_p, request.seed)
        await generation.acquire()
        if request.stream:
            return StreamingResponse(
                stream_events(lm, prompt_ids, sampling),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )

        def complete() -> tuple[list[int], str]:
            new = lm.generator.generate_ids(prompt_ids, *sampling)
            return new, lm.model.tokenizer.decode(new, skip_special_tokens=True)

        new, text = await asyncio.wrap_future(generation.start(complete))
        metrics.tokens.inc(len(new))
        return JSONResponse({"text": text, **finish(lm, len(prompt_ids), len(new), request.max_new_tokens)})

    def stream_events(lm, prompt_ids: list[int], sampling: tuple) -> AsyncIterator[str]:
        """Start generating on a model thread (under the slot the caller took) and relay its pieces as SSE.

        The thread holds the slot until it ends; it stops early when the client goes away.
        """
        loop, events, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        emit = partial(loop.call_soon_threadsafe, events.put_nowait)  # at most max_new_tokens pieces

        def produce() -> None:
            decoded = Decoded()
            try:
                for piece in decoded_text(lm.generator, prompt_ids, *sampling, [], decoded):
                    if gone.is_set():
                        break
                    emit(("piece", piece))
                emit(("end", decoded.tokens))
            except Exception:
                log.exception("serve: streamed generation failed")
                emit(("error", INTERNAL_ERROR))
            finally:
                metrics.tokens.inc(decoded.tokens)

        generation.start(produce)

        async def relay() -> AsyncIterator[str]:
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "piece":
                        yield f"data: {json.dumps({'text': value})}\n\n"
                    elif kind == "error":
                        metrics.errors.labels("/v1/generate").inc()
                        yield f"event: error\ndata: {json.dumps({'error': value})}\n\n"
                        return
                    else:
                        yield f"data: {json.dumps(finish(lm, len(prompt_ids), value, sampling[0]))}\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:
                gone.set()

        return relay()

    @app.post("/v1/classify")
    async def classify(request: ClassifyRequest) -> dict:
        clf = served("classifier")
        results = await admission.run(clf.model.classify, request.texts)
        return {"results": results, "model": clf.uri, "version": clf.version}

    return app


def finish(lm, prompt_tokens: int, new_tokens: int, max_new_tokens: int) -> dict[str, Any]:
    """What ends a generation's answer: token counts, why it stopped, which model version made it."""
    return {
        "tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "finish_reason": "length" if new_tokens == max_new_tokens else "stop",
        "model": lm.uri,
        "version": lm.version,
    }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose an unauthenticated server beyond this machine, or to guard one with a token
    that is easy to guess or that no client would send as set (stray whitespace)."""
    if token:
        if token != token.strip():
            raise ConfigError(
                f"{TOKEN_ENV}: starts or ends with whitespace; clients send the token without it (strip it)"
            )
        if not is_loopback(host) and len(token) < MIN_PUBLIC_TOKEN_CHARS:
            raise ConfigError(
                f"{TOKEN_ENV}: {len(token)} characters; a server bound to {host} (beyond loopback) needs "
                f"at least {MIN_PUBLIC_TOKEN_CHARS} (e.g. openssl rand -hex 24)"
            )
        return
    if not is_loopback(host):
        raise ConfigError(
            f"--host {host}: not a loopback address, and {TOKEN_ENV} is not set: an open server "
            f"would let anyone on the network use the models. Set {TOKEN_ENV} (clients then send "
            "Authorization: Bearer <token>) or bind to 127.0.0.1"
        )
    log.warning(
        "serve: %s is not set: /v1/* and /metrics answer without authentication (loopback %s only)", TOKEN_ENV, host
    )


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; a GptcoreError if the models cannot be loaded."""
    import uvicorn

    check_bind(host, token)
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        server.should_exit = True

    app = create_app(config, token, on_load_failure=stop)
    server = uvicorn.Server(uvicorn_config(app, config.limits, host=host, port=port))
    server.run()
    if app.state.load_state["error"] is not None:
        raise GptcoreError(f"cannot load the models: {app.state.load_state['error']}")


def uvicorn_config(app, limits: ServeLimits, **options: Any):
    """uvicorn's config for `app`: its connections guarded (connections.py) as `limits` say."""
    import uvicorn

    from gptcore.runtime.serve.connections import ConnectionLimits, protocol_class

    # Requests in progress (beyond: 503), so the bodies being read stay bounded too; well above the
    # admission bound, which answers 429 below it.
    max_requests = 2 * (limits.max_concurrency + limits.max_queue) + 64
    connections = ConnectionLimits(limits.request_timeout, limits.write_timeout, limits.max_connections, max_requests)
    return uvicorn.Config(
        app, http=protocol_class(connections), access_log=False, timeout_graceful_shutdown=10, **options
    )
