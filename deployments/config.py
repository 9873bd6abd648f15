"""AppConfig: serve_config.yaml's ``args``, validated once by build_app() and passed to every deployment."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmaas.app.auth import AuthSettings
from llmaas.app.config import EngineSettings, ModelSettings
from llmaas.app.protocol import MAX_N
from llmaas.app.rate_limit import RateLimitSettings
from llmaas.app.serving import RequestLimits
from llmaas.app.storage import Storage, open_storage
from llmaas.app.tools import ToolFormat
from llmaas.training.config import JobResources

# Ray Serve's own "throughput optimized" settings for the hops every streamed token crosses (model replica ->
# Router -> proxy): user code on the replica's main event loop instead of a thread of its own, and a deployment
# handle's router on the caller's loop instead of a thread of its own, so no streamed item changes threads on its
# way. Measured (benchmarks/serve_load.py --model-source tiny --serve-defaults, README): at concurrency 8 about 20%
# less CPU per streamed token in the Router and the model replica, 1.26x the HTTP throughput. Serve reads them
# when a replica starts: build_app() puts them in every replica's runtime_env, serve_config.yaml in the
# application's. Never in the environment a whole Ray cluster starts with: a driver (a Ray job calling the app
# through serve.get_app_handle) would inherit RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, and its handles then
# refuse calls made outside an event loop.
SERVE_ENV_VARS: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # the largest message a replica's gRPC server or channel takes (Serve's default is gRPC's 4 MiB): a whole
    # answer crosses a hop as one message, and n choices with top-20 logprobs pass 4 MiB (test_openai_api)
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(512 << 20),
}

# Serve's HTTP proxy forwards each request to the Router over a direct gRPC channel to the replica instead of a Ray
# actor call whose streamed items each go through Ray's object layer (the Router calls the model stage the same
# way: HandleBackend's ``_by_reference=False``). Measured (benchmarks/serve_load.py, README): at concurrency 8 the
# proxy's CPU per streamed token 0.71x, the Router's 0.49x (both hops) of Ray's object path. The proxy is started
# by Serve's controller and reads this from the environment of the Ray it runs in, so it goes where the Ray
# starts: `make serve` exports it (its `serve run` starts that Ray), a cluster's `ray start` needs it. It only
# changes how proxies call replicas, so unlike SERVE_ENV_VARS it is harmless to every other job on the cluster;
# without it the proxy takes Ray's object path, slower, same answers.
PROXY_ENV_VARS: dict[str, str] = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": SERVE_ENV_VARS["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"],
}


class AppConfig(BaseModel):
    """``args`` of serve_config.yaml's application, validated by build_app()."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings, description="Which base model to serve.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Inference engine knobs.")
    storage_root: str = Field(
        str(Path.home() / ".cache" / "llmaas" / "storage"),
        description="Registry, adapters, uploaded files, fine-tuning jobs and their checkpoints: a path (shared "
                    "storage on a multi-node cluster) or an object store URI, s3://bucket/prefix or "
                    "gs://bucket/prefix (credentials from the standard environment or the instance role).")
    encrypt_at_rest: bool = Field(
        False, description="Seal everything written under storage_root with AES-256-GCM (a data key per tenant, "
                           "wrapped by the master key every process reads from LLMAAS_MASTER_KEY_FILE); needs an "
                           "empty or already encrypted root. A root once encrypted stays so whatever this says.")
    adapter_cache_mb: float = Field(
        4096.0, gt=0, description="Local copies of adapter versions a model replica keeps when storage_root is an "
                                  "object store (LRU by bytes).")
    max_upload_mb: float = Field(100.0, gt=0, description="Largest /v1/files upload (413 above).")
    max_body_mb: float = Field(4.0, gt=0, description="Largest JSON request body (413 above).")
    max_messages: int = Field(256, ge=1, description="Most chat messages per request.")
    max_files_per_tenant: int = Field(100, ge=1, description="Uploaded files one tenant may keep (403 above).")
    max_file_mb_per_tenant: float = Field(
        1000.0, gt=0, description="Bytes of uploaded files one tenant may keep, in MB (403 quota_exceeded above).")
    response_cache_size: int = Field(
        0, ge=0, description="Cache this many deterministic (temperature 0 / seeded) responses; 0 turns it off.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys and tenants; none = open.")
    rate_limits: RateLimitSettings = Field(
        default_factory=RateLimitSettings, description="Requests per minute per tenant (429 above); off by default.")
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="End-to-end limit per HTTP request, admission to last token (408 / in-band error "
                                 "after it; the engine request is aborted); null = none.")
    max_n: int = Field(8, ge=1, le=MAX_N, description="Largest `n` (choices per request) accepted.")
    max_choices: int | None = Field(
        None, ge=1, description="Most choices one request may ask for, prompts x n (a list of prompts fans out); "
                                "default: max_n.")
    max_jobs_per_tenant: int = Field(
        2, ge=1, description="Fine-tuning jobs one tenant may have queued or running at once (429 above).")
    finetuning: JobResources = Field(
        default_factory=JobResources,
        description="Cluster resources of every fine-tuning job submitted over the API (workers, CPUs/GPUs per "
                    "worker, retries, how long to wait for resources); tenants cannot set these.")
    max_stop_sequences: int = Field(4, ge=0, description="Most stop strings per request (OpenAI allows 4).")
    tokenize_in_router: bool = Field(
        True, description="The Router encodes prompts itself (a worker thread in its replica) instead of calling "
                          "the Tokenizer deployment: one hop fewer per request. false: the Tokenizer deployment's "
                          "replicas do it, scaling apart from the Router.")
    stream_interval_ms: float = Field(
        0.0, ge=0, description="Streams: the model stage gathers the tokens of this many milliseconds into one "
                               "message to the Router (and one SSE event); the first token is never held. 0 sends "
                               "each step's tokens as they come. Non-streaming requests cross in two messages (the "
                               "first token, the rest); requests with stop strings always get each step's tokens.")
    usage_metering: bool = Field(
        True, description="Meter every answered request and fine-tuning job per tenant and model version (GET "
                          "/v1/usage, `llmaas usage`); false: no usage records (and no monthly token quotas).")
    tool_format: ToolFormat = Field(
        "auto", description="How the model writes tool calls under tool_choice auto: smollm2 (<tool_call>[...] "
                            "lists, tools in the system turn), hermes (Qwen2.5 / Hermes <tool_call> tags), llama3 "
                            "(bare JSON calls). auto reads it from the chat template.")

    @field_validator("storage_root", mode="before")
    @classmethod
    def _root_as_text(cls, v: object) -> object:
        return str(v) if isinstance(v, Path) else v  # a path or an s3:// / gs:// URI, kept as written

    @model_validator(mode="after")
    def _quotas_need_metering(self) -> "AppConfig":
        limits = self.rate_limits
        if not self.usage_metering and (limits.monthly_tokens or any(t.monthly_tokens for t in
                                                                      limits.tenant_tokens.values())):
            raise ValueError("rate_limits monthly_tokens counts metered usage: it needs usage_metering true")
        return self

    def request_limits(self) -> RequestLimits:
        return RequestLimits(max_n=self.max_n, max_choices=self.max_choices or self.max_n,
                             max_stop_sequences=self.max_stop_sequences, max_messages=self.max_messages)

    def open_storage(self) -> Storage:
        """The storage root, marked encrypted first when ``encrypt_at_rest`` asks (every deployment calls this
        before touching storage, so no process writes a clear object into a root that is to be encrypted)."""
        return open_storage(self.storage_root, encrypt=self.encrypt_at_rest)
