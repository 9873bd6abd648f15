"""Router: the FastAPI ingress and postprocessing stage.

HTTP routes and the Python handle API (``chat``, ``completions``, ``chat_stream``,
``completions_stream``) share one OpenAIServing core; errors leave as OpenAI-shaped
JSON with OpenAI's status codes (400 for validation, never FastAPI's 422).

No ``from __future__ import annotations`` here: Serve's ingress rebuilds the routes
and needs real annotation objects to see pydantic bodies (strings became query params).
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from grpc.aio import AioRpcError
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.staticfiles import StaticFiles
from transformers import AutoTokenizer

from llmaas.app.access import CreateKeyRequest
from llmaas.app.auth import ANONYMOUS, Authenticator, Principal, require_admin
from llmaas.app.catalog import ModelCatalog
from llmaas.app.deadline import Deadline
from llmaas.app.errors import (
    APIError,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    unwrap,
)
from llmaas.app.model_source import base_model_info, resolve_model
from llmaas.app.names import BASE_ALIAS
from llmaas.app.prompts import PromptEncoder
from llmaas.app.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from llmaas.app.rate_limit import budget_headers, retry_after
from llmaas.app.registry import RegistryState
from llmaas.app.response_cache import ResponseCache
from llmaas.app.serving import OpenAIServing, Prepared
from llmaas.app.storage import StorageUnavailable
from llmaas.app.tools import tool_family
from llmaas.app.usage import check_bucket, parse_group_by, parse_time
from llmaas.deployments.access_service import AccessClient
from llmaas.deployments.config import AppConfig
from llmaas.deployments.handle_backend import HandleBackend
from llmaas.deployments.long_poll import LongPoll
from llmaas.deployments.management import Management, PromoteRequest, RegisterAdapterRequest
from llmaas.deployments.metrics import RouterMetrics
from llmaas.deployments.usage_service import UsageMeter
from llmaas.training.api import FineTuningJobObject, FineTuningJobRequest
from llmaas.training.files import FileObject, FileStore

logger = logging.getLogger("ray.serve")

api = FastAPI(title="llmaas", description="OpenAI-compatible serving of a base model and its LoRA adapters.")


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as OpenAI's ``param``: field names and indexes, without the tags pydantic
    adds for union members ('str', 'list[int]', 'constrained-str')."""
    parts = [str(p) for p in loc if p != "body" and not _is_type_tag(p)]
    return ".".join(parts) or None


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool"))


OPEN_PATHS = {"/health"}  # answers without a key when keys are configured (and the console's static files)
# the web console: static files the browser runs against the same API and keys, at /ui/
api.mount("/ui", StaticFiles(directory=Path(__file__).resolve().parent / "console", html=True), name="console")


class _BodyTooLarge(HTTPException):
    """Raised from ``receive``: FastAPI re-raises its HTTPException met while reading a body (others become 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds {limit} bytes")


class _BodyCap:
    """Counts the body bytes actually read, chunked or not, and stops at the cap with a 413.

    The gate middleware's Content-Length check refuses a declared size unread; this covers what a header
    does not declare (Transfer-Encoding: chunked) or understates: nothing past the cap is ever buffered.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        gate: _Gate | None = getattr(scope["app"].state, "gate", None) if "app" in scope else None
        if scope["type"] != "http" or gate is None:
            return await self.app(scope, receive, send)
        limit = gate.body_limit(scope["path"])
        read = 0

        async def capped():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise _BodyTooLarge(limit)
            return message

        await self.app(scope, capped, send)


# Inside the gate below (added first): its 413 is raised from the body read in the route, where FastAPI hands its
# HTTPException to the exception handlers (any other error there would become a 400).
api.add_middleware(_BodyCap)


class _GateMiddleware:
    """Every route but /health needs a key (when keys exist) and spends the tenant's rate budget; JSON bodies over
    the cap get 413 unread; the answer's start carries the budget headers and is counted in the metrics.

    Plain ASGI: a streamed answer's chunks go straight to ``send`` (Starlette's ``@app.middleware("http")`` relays
    every chunk through a memory stream read by another task, CPU paid per token)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)  # its state is the scope's, which the route's Request sees too
        gate: _Gate | None = getattr(request.app.state, "gate", None)
        if gate is None:
            return await _error(503, "the service is starting", "service_unavailable")(scope, receive, send)
        state = request.state

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                if (budget := getattr(state, "budget", None)) is not None:  # a route may have charged more
                    headers.update(budget_headers(budget))
                if (tokens := getattr(state, "token_budget", None)) is not None:
                    headers.update(budget_headers(tokens, "tokens"))
                gate.count(scope, message["status"], getattr(state, "principal", None))
            await send(message)

        try:
            await self._admit(gate, request)
        except APIError as exc:
            return await _api_error_response(exc)(scope, receive, send_counted)
        await self.app(scope, receive, send_counted)

    @staticmethod
    async def _admit(gate: "_Gate", request: Request) -> None:
        """Who asks (``request.state.principal``) and their rate budget; raises the refusal."""
        path = request.url.path
        root = request.scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"  # the app may be mounted under a route prefix
        if path in OPEN_PATHS or path == "/ui" or path.startswith("/ui/"):  # the console's files hold no data
            request.state.principal = ANONYMOUS
        else:
            if gate.auth.enabled:
                await gate.access.ensure_watching()  # runtime keys loaded, revocations applied as they happen
            try:
                request.state.principal = gate.auth.authenticate(request.headers.get("authorization"))
            except APIError as exc:
                gate.access.refused(path, exc.code or "unauthorized", None, request.client.host if request.client
                                    else None)
                raise
            request.state.budget = await gate.meter.acquire(request.state.principal.tenant)
        length = request.headers.get("content-length")
        limit = gate.body_limit(path)
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise PayloadTooLarge(f"request body exceeds {limit} bytes", code="body_too_large")


api.add_middleware(_GateMiddleware)  # added last: the outer of the two


def principal(request: Request) -> Principal:
    return request.state.principal


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return _error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                      "invalid_request_error", None, "invalid_json")
    param = _loc_param(tuple(first.get("loc", ())))
    msg = "; ".join(f"{_loc_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in exc.errors()[:5])
    return _error(400, msg, "invalid_request_error", param, first.get("type"))


def _api_error_response(exc: APIError) -> JSONResponse:
    headers = None
    if isinstance(exc, RateLimited):
        headers = {**exc.headers, "Retry-After": retry_after(exc.retry_after_s)}
    elif exc.status_code in (429, 503):
        headers = {"Retry-After": "1"}  # overload: come back soon
    return JSONResponse(status_code=exc.status_code, content=exc.to_dict(), headers=headers)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return _api_error_response(exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    return _error(exc.status_code, str(exc.detail), type_, code="body_too_large" if exc.status_code == 413 else None)


def _as_api_error(exc: BaseException) -> APIError | None:
    """What the client is told of a failure from below: our own errors as they are, Ray's named ones as 503s."""
    inner = unwrap(exc)
    if isinstance(inner, APIError):
        return inner
    if isinstance(inner, RayActorError):  # the model replica running this request died (node lost, OOM, kill)
        return ServiceUnavailable("the model replica running this request died; retry", code="replica_died")
    if isinstance(inner, AioRpcError):  # its gRPC stream broke: the replica went away or was reset
        return ServiceUnavailable(f"the model replica running this request went away ({inner.code().name}); retry",
                                  code="replica_died")
    if type(inner).__name__ == "BackPressureError":  # a downstream deployment's queue is full
        return ServiceUnavailable("the model stage is overloaded; retry shortly")
    if isinstance(inner, StorageUnavailable):  # the bucket (or its endpoint) is down: nothing was changed
        return ServiceUnavailable(str(inner), code="storage_unavailable")
    return None


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    err = _as_api_error(exc)
    if err is not None:
        return _api_error_response(err)
    logger.exception("unhandled error", exc_info=exc)
    return _error(500, f"internal error: {type(unwrap(exc)).__name__}", "internal_error")


def _sse(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield f"data: {c.model_dump_json(exclude_none=False)}\n\n"
        except Exception as exc:  # headers are gone: report in-band, as OpenAI does
            err = _as_api_error(exc)
            if err is None:
                logger.exception("stream failed", exc_info=exc)
                err = APIError(f"internal error: {type(unwrap(exc)).__name__}")
            yield f"data: {json.dumps(err.to_dict())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Gate:
    """Per-replica request gate state the middleware reads from ``app.state``."""

    def __init__(self, auth: Authenticator, access: AccessClient, meter: UsageMeter, max_body_bytes: int,
                 max_upload_bytes: int, metrics: RouterMetrics | None = None, cache: ResponseCache | None = None
                 ) -> None:
        self.auth = auth
        self.access = access
        self.meter = meter  # the cluster's usage ledger and rate-limit buckets
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.metrics = metrics
        self.cache = cache

    def count(self, scope, status: int, who: Principal | None) -> None:
        """One answer in the request metrics (and the response cache's hits since the last)."""
        if self.metrics is None:
            return
        route = scope.get("route")
        self.metrics.on_request(getattr(route, "path", "unmatched"), status, who.tenant if who is not None else None)
        cache = self.cache
        if cache is not None and (cache.hits or cache.misses):
            self.metrics.on_cache(cache.hits, cache.misses)
            cache.hits = cache.misses = 0

    def body_limit(self, path: str) -> int:
        """Bytes a request body may have: uploads get their file cap plus room for the multipart framing."""
        return self.max_upload_bytes + 65536 if path.endswith("/v1/files") else self.max_body_bytes


def _parse(model: type[BaseModel], request: BaseModel | dict) -> Any:
    if isinstance(request, model):
        return request
    try:
        return model.model_validate(request)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"{_loc_param(tuple(first['loc']))}: {first['msg']}",
                             param=_loc_param(tuple(first["loc"]))) from None


# graceful_shutdown_wait_loop_s: a stopping replica looks for requests still in flight this often (Serve: every
# 2 s, which every delete, redeploy and scale-down waited out at least once)
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=512, graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(api)
class Router:
    def __init__(self, tokenizer: DeploymentHandle, llm: DeploymentHandle, config: AppConfig) -> None:
        storage = config.open_storage()  # an encrypted root is marked before anything is written to it
        if storage.encrypted:
            # uploads stay in memory (each at most max_upload_mb): Starlette would spool those over 1 MB to disk
            MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size,
                                                 int(config.max_upload_mb * (1 << 20)) + (1 << 20))
        model = resolve_model(config.model)
        self.llm = llm
        self.manage = Management(config.storage_root, model.path,
                                 base_model_info(model.path, config.engine.max_lora_rank),
                                 (model.served_name, BASE_ALIAS), int(config.max_upload_mb * (1 << 20)),
                                 config.finetuning, config.max_jobs_per_tenant,
                                 FileStore(storage, config.max_files_per_tenant,
                                           int(config.max_file_mb_per_tenant * (1 << 20))),
                                 metering=config.usage_metering)
        self.catalog = ModelCatalog(model.served_name, model.max_model_len,
                                    ray.get(self.manage.registry.snapshot.remote()))
        self.metrics = RouterMetrics()
        cache = ResponseCache(config.response_cache_size)
        auth = Authenticator(config.auth.load_keys())
        scope = config.engine.prefix_cache_scope or ("tenant" if auth.enabled else "global")
        encoder = None
        if config.tokenize_in_router:  # its own tokenizer copy: encoding never shares one with decoding here
            encoder = PromptEncoder(AutoTokenizer.from_pretrained(model.path), model.served_name,
                                    model.max_model_len, config.tool_format)
        decoder = AutoTokenizer.from_pretrained(model.path)
        self.meter = UsageMeter(config.storage_root, config.rate_limits, self.metrics, config.usage_metering)
        self.serving = OpenAIServing(HandleBackend(tokenizer, llm, encoder), decoder,
                                     self.catalog, config.request_limits(), cache, self.metrics,
                                     prefix_cache_per_tenant=scope == "tenant",
                                     stream_interval_s=config.stream_interval_ms / 1e3,
                                     tool_family=tool_family(decoder.chat_template, config.tool_format),
                                     meter=self.meter)
        self._registry_poll = LongPoll("registry", self.manage.registry.snapshot.remote,
                                       lambda: self.manage.watch(self.catalog.state.generation), self._set_state)
        self.access = AccessClient(config.storage_root, auth)
        self.auth_configured = auth.enabled  # runtime keys are made only where config keys turned auth on
        api.state.gate = _Gate(auth, self.access, self.meter, int(config.max_body_mb * (1 << 20)),
                               self.manage.max_upload_bytes, self.metrics, cache)
        self.timeout_s = config.request_timeout_s
        if not auth.enabled:
            logger.warning("llmaas: no API keys configured, every request is accepted; keep the HTTP proxy on "
                           "127.0.0.1 (serve_config.yaml http_options.host) or configure auth.api_keys_file")

    async def _watch(self) -> None:
        """Keeps the catalog's registry snapshot fresh: a long poll that returns on every change (the first call
        waits for a snapshot)."""
        await self._registry_poll.ensure()

    def _set_state(self, state: RegistryState) -> bool:
        # Generations only grow (the registry actor restamps a restored, older file past what Routers saw), so a
        # late answer of an earlier poll never overwrites a newer state.
        if state.generation >= self.catalog.state.generation:
            self.catalog.state = state
            return True
        return False

    async def _charge_choices(self, request: Request, who: Principal, choices: int) -> None:
        """The rate limit counts choices, not requests: the gate spent one, a request of k choices spends k - 1
        more (one above max_choices is refused after this and costs no more than the cap)."""
        capacity = self.meter.limits.limit_for(who.tenant)
        if capacity is None or getattr(request.state, "budget", None) is None:
            return
        extra = min(choices, self.serving.limits.max_choices, capacity) - 1  # never more than a bucket holds
        if extra > 0:
            request.state.budget = await self.meter.acquire(who.tenant, cost=extra)

    async def _reserve_tokens(self, request: Request, prep: Prepared) -> Prepared:
        """Checks the tenant's monthly quota and reserves the most the request can use from its token rate (429
        before any model time); the meter gives back what it did not use."""
        budget = await self.meter.reserve_tokens(prep.tenant, prep.most_tokens())
        if budget is not None:
            request.state.token_budget = budget
            prep.reserved_tokens = budget.taken  # a request above a whole bucket took the bucket
        return prep

    # ----- HTTP: inference -----
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models", response_model=ModelList)
    async def list_models(self, who: Principal = Depends(principal)) -> ModelList:
        await self._watch()
        return self.serving.models(who.tenant)

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(self, model_id: str, who: Principal = Depends(principal)) -> ModelCard:
        await self._watch()
        return self.serving.model(model_id, who.tenant)

    @api.post("/v1/chat/completions")
    async def http_chat(self, request: ChatCompletionRequest, http: Request, who: Principal = Depends(principal)):
        deadline = Deadline.start(self.timeout_s)
        await self._charge_choices(http, who, request.n)
        await self._watch()
        # 4xx (limits included) before the stream opens; a timeout after it is reported in-band
        prepared = await self._reserve_tokens(http, await deadline.run(self.serving.prepare_chat(request, who.tenant)))
        if request.stream:
            return _sse(deadline.stream(self.serving.chat_stream(request, prepared)))
        return await deadline.run(self.serving.chat(request, who.tenant, prepared))

    @api.post("/v1/completions")
    async def http_completions(self, request: CompletionRequest, http: Request,
                               who: Principal = Depends(principal)):
        deadline = Deadline.start(self.timeout_s)
        await self._charge_choices(http, who, len(request.prompts()) * request.n)
        await self._watch()
        prepared = await self._reserve_tokens(http, await deadline.run(
            self.serving.prepare_completion(request, who.tenant)))
        if request.stream:
            return _sse(deadline.stream(self.serving.completion_stream(request, prepared)))
        return await deadline.run(self.serving.completion(request, who.tenant, prepared))

    # ----- HTTP: files -----
    @api.post("/v1/files", response_model=FileObject)
    async def upload_file(self, file: UploadFile = File(...), purpose: str = Form(...),
                          who: Principal = Depends(principal)):
        # a worker thread: copying and validating a large upload must not stall other requests' streams
        return await asyncio.to_thread(self.manage.upload, file.file, file.filename or "upload.jsonl", purpose,
                                       who.tenant)

    # Storage calls (files, job records) run in worker threads: on a bucket each is a network round trip, and the
    # event loop streams every in-flight request's tokens.
    @api.get("/v1/files")
    async def list_files(self, who: Principal = Depends(principal)):
        files = await asyncio.to_thread(self.manage.files.list, who.tenant)
        return {"object": "list", "data": [f.model_dump() for f in files], "has_more": False}

    @api.get("/v1/files/{file_id}", response_model=FileObject)
    async def get_file(self, file_id: str, who: Principal = Depends(principal)):
        return await asyncio.to_thread(self.manage.files.get, file_id, who.tenant)

    @api.delete("/v1/files/{file_id}")
    async def delete_file(self, file_id: str, who: Principal = Depends(principal)):
        await asyncio.to_thread(self.manage.files.delete, file_id, who.tenant)
        return {"id": file_id, "object": "file", "deleted": True}

    # ----- HTTP: fine-tuning -----
    @api.post("/v1/fine_tuning/jobs", response_model=FineTuningJobObject)
    async def create_job(self, request: FineTuningJobRequest, who: Principal = Depends(principal)):
        return await self.manage.create_job(request, who.tenant)

    @api.get("/v1/fine_tuning/jobs")
    async def list_jobs(self, limit: int = Query(20, ge=1, le=100), after: str | None = None,
                        who: Principal = Depends(principal)):
        return await asyncio.to_thread(self.manage.list_jobs, limit, after, who.tenant)

    @api.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJobObject)
    async def get_job(self, job_id: str, who: Principal = Depends(principal)):
        return await asyncio.to_thread(self.manage.get_job, job_id, who.tenant)

    @api.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJobObject)
    async def cancel_job(self, job_id: str, who: Principal = Depends(principal)):
        return await self.manage.cancel_job(job_id, who.tenant)

    @api.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(self, job_id: str, limit: int = Query(20, ge=1, le=1000), after: str | None = None,
                         who: Principal = Depends(principal)):
        return await asyncio.to_thread(self.manage.job_events, job_id, limit, after, who.tenant)

    @api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(self, job_id: str, who: Principal = Depends(principal)):
        return await asyncio.to_thread(self.manage.job_checkpoints, job_id, who.tenant)

    # ----- HTTP: usage -----
    @api.get("/v1/usage")
    async def usage(self, start: str | None = None, end: str | None = None, group_by: str | None = None,
                    bucket_width: str | None = None, tenant: str | None = None,
                    who: Principal = Depends(principal)):
        """Metered usage in [start, end) (unix seconds or ISO 8601): a tenant's key sees its own, an admin's
        everyone's (or one tenant's with ``tenant=``)."""
        if not self.meter.metering:
            raise NotFound("usage metering is off on this service (usage_metering: false)", code="metering_off")
        if tenant is not None and not who.admin and tenant != who.tenant:
            raise Forbidden("a tenant key sees its own usage only", param="tenant", code="admin_required")
        mine = tenant if who.admin else who.tenant
        return await self.meter.service.query.remote(
            parse_time(start, "start"), parse_time(end, "end"), mine, who.admin and tenant is None,
            parse_group_by(group_by), check_bucket(bucket_width))

    @api.get("/v1/status")
    async def status(self, who: Principal = Depends(principal)):
        """The model replicas this Router reaches: running / waiting sequences, KV-cache use, adapters loaded
        (admin keys; several calls in flight at once, so Serve spreads them over the replicas)."""
        self._admin(who, "status")
        seen = {s["replica"]: s for s in await asyncio.gather(*[self.llm.stats.remote() for _ in range(8)])}
        return {"object": "list", "replicas": [seen[r] for r in sorted(seen)]}

    # ----- HTTP: adapter administration (admin keys only) -----
    def _admin(self, who: Principal, what: str) -> None:
        """403 for a non-admin key, written to the audit log."""
        if not who.admin:
            self.access.refused(what, "admin_required", who.tenant)
        require_admin(who)

    @api.get("/v1/adapters")
    async def list_adapters(self, who: Principal = Depends(principal)):
        self._admin(who, "adapters.list")
        await self._watch()
        return self.catalog.state.model_dump()

    @api.post("/v1/adapters")
    async def register_adapter(self, request: RegisterAdapterRequest, who: Principal = Depends(principal)):
        self._admin(who, "adapter.register")
        version, state = await self.manage.register_adapter(request)
        self._set_state(state)
        await self.access.admin_action("adapter.register", who, version, {"path": request.path,
                                                                          "promote": request.promote})
        return {"id": version, "object": "model"}

    @api.post("/v1/adapters/{name}/promote")
    async def promote_adapter(self, name: str, request: PromoteRequest, who: Principal = Depends(principal)):
        self._admin(who, "adapter.promote")
        self._set_state(await self.manage.promote(name, request))
        await self.access.admin_action("adapter.promote", who, f"{name}@{request.version}",
                                       {"canary_share": request.canary_share})
        return self.catalog.state.adapters[name].model_dump()

    @api.post("/v1/adapters/{name}/rollback")
    async def rollback_adapter(self, name: str, who: Principal = Depends(principal)):
        self._admin(who, "adapter.rollback")
        self._set_state(await self.manage.rollback(name))
        await self.access.admin_action("adapter.rollback", who, name)
        return self.catalog.state.adapters[name].model_dump()

    @api.delete("/v1/adapters/{model}")
    async def delete_adapter(self, model: str, who: Principal = Depends(principal)):
        self._admin(who, "adapter.delete")
        self._set_state(await self.manage.delete_version(model))
        await self.access.admin_action("adapter.delete", who, model)
        return {"id": model, "object": "model", "deleted": True}

    # ----- HTTP: API keys at runtime and the audit log (admin keys only) -----
    @api.post("/v1/keys")
    async def create_key(self, request: CreateKeyRequest, who: Principal = Depends(principal)):
        """A new key; its secret is in this answer only."""
        self._admin(who, "key.create")
        if not self.auth_configured:
            raise InvalidRequest("keys are created at runtime only when auth is on: put an admin key in "
                                 "auth.api_keys_file first", code="auth_off")
        record, secret = await self.access.service.create.remote(request, who)
        return {**record.model_dump(), "key": secret}

    @api.get("/v1/keys")
    async def list_keys(self, who: Principal = Depends(principal)):
        self._admin(who, "key.list")
        records = await self.access.service.list_keys.remote()
        return {"object": "list", "data": [r.model_dump() for r in records]}

    @api.delete("/v1/keys/{key_id}")
    async def revoke_key(self, key_id: str, who: Principal = Depends(principal)):
        self._admin(who, "key.revoke")
        record = await self.access.service.revoke.remote(key_id, who)
        return {"id": record.id, "object": "api_key", "deleted": True, "revoked_at": record.revoked_at}

    @api.get("/v1/audit")
    async def audit(self, start: str | None = None, end: str | None = None, action: str | None = None,
                    limit: int = Query(100, ge=1, le=1000), who: Principal = Depends(principal)):
        """Admin actions and refused keys, newest first; ``action`` filters by prefix ('key.', 'adapter.')."""
        self._admin(who, "audit.read")
        events = await self.access.service.read_audit.remote(parse_time(start, "start"), parse_time(end, "end"),
                                                             limit, action)
        return {"object": "list", "data": [e.model_dump() for e in events]}

    # ----- Python handle API: same types and the same request timeout as HTTP -----
    async def chat(self, request: ChatCompletionRequest | dict):
        """``await handle.chat.remote({...})`` -> ChatCompletionResponse."""
        deadline = Deadline.start(self.timeout_s)
        await self._watch()
        return await deadline.run(self.serving.chat(_parse(ChatCompletionRequest, request)))

    async def completions(self, request: CompletionRequest | dict):
        """``await handle.completions.remote({...})`` -> CompletionResponse."""
        deadline = Deadline.start(self.timeout_s)
        await self._watch()
        return await deadline.run(self.serving.completion(_parse(CompletionRequest, request)))

    async def chat_stream(self, request: ChatCompletionRequest | dict):
        """``handle.options(stream=True).chat_stream.remote({...})`` yields ChatCompletionChunk."""
        deadline = Deadline.start(self.timeout_s)
        await self._watch()
        async for chunk in deadline.stream(self.serving.chat_stream(_parse(ChatCompletionRequest, request))):
            yield chunk

    async def completions_stream(self, request: CompletionRequest | dict):
        """``handle.options(stream=True).completions_stream.remote({...})`` yields CompletionResponse chunks."""
        deadline = Deadline.start(self.timeout_s)
        await self._watch()
        async for chunk in deadline.stream(self.serving.completion_stream(_parse(CompletionRequest, request))):
            yield chunk
