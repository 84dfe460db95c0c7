"""Entrypoints layer: the OpenAI-compatible HTTP server — the FastAPI app and its uvicorn runner.

    pagoda serve smollm2-135m --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "Hello", "max_tokens": 8}'

The engine runs in its own process behind `AsyncLLM`. Start-up builds it and
runs a short warm-up generation before uvicorn accepts connections, so
`/health` answers 200 only once the first request will be as fast as later
ones; it answers 503 once the engine process has died, or while the server
drains at shutdown (SIGTERM: drain.py). `/` serves the chat page
(static/chat.html) unless `--no-chat-page`.
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pagoda import envs
from pagoda.engine.arg_utils import EngineArgs
from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.exceptions import EngineDeadError
from pagoda.entrypoints.openai.drain import DEFAULT_SHUTDOWN_TIMEOUT_SECONDS, Drain, DrainingServer
from pagoda.entrypoints.openai.errors import (
    OpenAIError,
    bad_request,
    describe_errors_in_openapi,
    install_error_handlers,
)
from pagoda.entrypoints.openai.metrics import ServerMetrics
from pagoda.entrypoints.openai.middleware import (
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS,
    RequestGuardMiddleware,
)
from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from pagoda.entrypoints.openai.responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.serving_completions import OpenAIServingCompletion
from pagoda.entrypoints.openai.serving_engine import engine_dead_error
from pagoda.entrypoints.openai.unsupported import log_unknown_fields
from pagoda.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# A scrape waits at most this long for the engine's current gauges.
_STATS_TIMEOUT_SECONDS = 5.0
_WARM_UP_TEXT = "Warming up: the quick brown fox jumps over the lazy dog, then counts one, two, three, four."


@dataclass
class ServerState:
    engine: AsyncLLM
    completions: OpenAIServingCompletion
    chat: OpenAIServingChat
    metrics: ServerMetrics


async def warm_up(engine: AsyncLLM) -> None:
    """A greedy and a sampled request side by side: batched prefill, decode and both sampler paths run once."""
    prompt = engine.get_tokenizer().encode(_WARM_UP_TEXT)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    sampled = greedy.clone(temperature=1.0, top_p=0.9, top_k=50, seed=0)

    async def run(params: SamplingParams, request_id: str) -> None:
        async for _ in engine.generate(prompt, params, request_id):
            pass

    await asyncio.gather(run(greedy, "warm-up-greedy"), run(sampled, "warm-up-sampled"))


router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> Response:
    try:
        await _state(request).engine.check_health()
    except EngineDeadError as error:
        return engine_dead_error(error).response()
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = _state(request)
    # Gauges as of now: the last step's figures miss aborts since (an idle engine takes no steps).
    # A dead or stuck engine leaves the last figures in place.
    with contextlib.suppress(EngineDeadError, asyncio.TimeoutError):
        if not state.engine.errored:
            stats = await asyncio.wait_for(state.engine.get_scheduler_stats(), _STATS_TIMEOUT_SECONDS)
            state.metrics.record_scheduler_stats(stats)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request) -> Response:
    """Forget the engine's prefix cache (as vLLM's endpoint does); 409 while requests still hold blocks."""
    try:
        reset = await _state(request).engine.reset_prefix_cache()
    except EngineDeadError as error:
        return engine_dead_error(error).response()
    if not reset:
        raise OpenAIError(HTTPStatus.CONFLICT, "requests still hold cached blocks; try again once they finish",
                          code="prefix_cache_busy")
    return Response(status_code=200)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    serving = _state(request).completions
    root = serving.engine.config.model_config.path
    cards = [ModelCard(id=name, root=root, max_model_len=serving.max_model_len) for name in serving.model_names]
    return JSONResponse(ModelList(data=cards).model_dump())


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await _state(request).completions.create_completion(body, request)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await _state(request).chat.create_chat_completion(body, request)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    serving = _state(request).chat
    serving.check_model(body.model)
    log_unknown_fields(body, "/tokenize")
    if body.messages is not None:
        token_ids = serving.chat_token_ids(body.messages, body.add_generation_prompt)
    elif body.prompt is not None:
        token_ids = serving.encode(body.prompt, "prompt", add_special_tokens=body.add_special_tokens)
    else:
        raise bad_request("send either prompt or messages", "prompt")
    response = TokenizeResponse(count=len(token_ids), max_model_len=serving.max_model_len, tokens=token_ids)
    return JSONResponse(response.model_dump())


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    serving = _state(request).chat
    serving.check_model(body.model)
    log_unknown_fields(body, "/detokenize")
    serving.check_token_ids(body.tokens, "tokens")
    return JSONResponse(DetokenizeResponse(prompt=serving.tokenizer.decode(body.tokens)).model_dump())


async def chat_page_response() -> HTMLResponse:
    """The chat page (one static file shipped in the package)."""
    page = resources.files("pagoda.entrypoints.openai").joinpath("static/chat.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


def create_app(
    engine_args: EngineArgs,
    model_names: list[str],
    api_key: str | None = None,
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
    drain: Drain | None = None,
    metrics_without_api_key: bool = False,
    request_body_timeout: float = DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS,
    chat_page: bool = True,
) -> FastAPI:
    """The app; its lifespan starts the engine, warms it up, and shuts it down at exit."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.monotonic()
        engine = AsyncLLM.from_engine_args(engine_args)
        try:
            server_metrics = ServerMetrics(model_names[0])
            engine.add_stat_logger(server_metrics)
            await warm_up(engine)
            app.state.server = ServerState(
                engine=engine,
                completions=OpenAIServingCompletion(engine, model_names),
                chat=OpenAIServingChat(engine, model_names),
                metrics=server_metrics,
            )
            if drain is not None:
                drain.engine = engine
            logger.info("serving %s; ready %.1f s after start-up began", model_names, time.monotonic() - started)
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="Pagoda", lifespan=lifespan)
    install_error_handlers(app)
    # The page itself is public (it asks for the key); its calls to /v1 are not.
    open_paths = frozenset({"/health"} | ({"/metrics"} if metrics_without_api_key else set())
                           | ({"/"} if chat_page else set()))
    app.add_middleware(RequestGuardMiddleware, api_key=api_key, max_body_bytes=max_request_body_bytes, drain=drain,
                       open_paths=open_paths, body_timeout_s=request_body_timeout)
    app.include_router(router)
    if chat_page:
        app.add_api_route("/", chat_page_response, methods=["GET"], include_in_schema=False)
    describe_errors_in_openapi(app)
    return app


def run_server(engine_args: EngineArgs, host: str, port: int, api_key: str | None,
               served_model_name: str | None, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
               metrics_without_api_key: bool = False,
               request_body_timeout: float = DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS, chat_page: bool = True) -> None:
    drain = Drain(shutdown_timeout)
    app = create_app(engine_args, [served_model_name or engine_args.model], api_key, drain=drain,
                     metrics_without_api_key=metrics_without_api_key, request_body_timeout=request_body_timeout,
                     chat_page=chat_page)
    # Past the drain every request has ended; the connections get a few seconds to send their last bytes.
    config = uvicorn.Config(app, host=host, port=port, log_level=envs.log_level().lower(), timeout_keep_alive=5,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, drain).run()
