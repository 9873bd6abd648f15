"""Fine-tuning job config (pydantic edge): validated once, errors name the field."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmaas.app.names import name_problem
from llmaas.engine import LORA_TARGET_MODULES

Metric = Literal["loss", "perplexity", "accuracy", "macro_f1", "exact_match", "rouge_l", "json_valid",
                 "field_accuracy", "json_valid_grammar", "field_accuracy_grammar"]


class LoRASettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=256, description="LoRA rank; must not exceed the server's max_lora_rank (16).")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: deltas are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[Literal[LORA_TARGET_MODULES]] = Field(  # Literal[tuple] == Literal[*tuple]
        list(LORA_TARGET_MODULES), min_length=1, description="Projections that get adapters.")


def check_json_schema(schema: dict[str, Any]) -> None:
    """A ValueError unless ``schema`` is a JSON schema that grammar-constrained decoding supports."""
    import jsonschema

    from llmaas.app.errors import APIError
    from llmaas.app.structured import grammar_for_schema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
        grammar_for_schema(schema, "eval.json_schema")
    except (jsonschema.SchemaError, APIError) as exc:
        raise ValueError(f"eval.json_schema: {getattr(exc, 'message', exc)}") from None


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metrics: list[Metric] = Field(["loss", "perplexity"], description="Computed on the validation set.")
    labels: list[str] | None = Field(
        None, description="Classification labels: accuracy/macro_f1 compare the generated label with the answer.")
    max_new_tokens: int = Field(16, ge=1, le=512, description="Generation budget for generated metrics.")
    max_examples: int = Field(200, ge=1, description="Validation examples used for generated metrics.")
    json_schema: dict[str, Any] | None = Field(
        None, description="Structured output: json_valid counts answers that parse and follow this schema (without "
                          "one: any JSON object), field_accuracy the reference's top-level fields answered exactly; "
                          "the *_grammar metrics score answers decoded under the schema's grammar (as "
                          "response_format json_schema serves them).")
    thresholds: dict[Metric, float] = Field(
        default_factory=dict, description="Promotion gate, e.g. {accuracy: 0.8} (loss/perplexity: at most).")


class JobResources(BaseModel):
    """What a job takes from the cluster. Over the HTTP API these are the operator's (serve_config.yaml
    ``finetuning``), never the tenant's; in a job.yaml or from Python they are the caller's."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int | None = Field(
        None, ge=1, description="Ray Train workers (DDP); unset: 2 (one per free GPU with use_gpu).")
    use_gpu: bool = Field(False)
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs per worker; unset: an equal share of the CPUs free when the job starts, "
                                "at most 1, so a job fits beside serving on a small node.")
    resource_wait_s: float = Field(
        600.0, gt=0, description="How long a job waits for its workers' resources before it fails "
                                 "(resources_unavailable).")
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="SPREAD puts the workers on different nodes when it can.")
    max_failures: int = Field(2, ge=0, description="Worker failures survived by resuming from the last checkpoint.")


class FineTuneJob(JobResources):
    """One LoRA fine-tuning job (CLI yaml, HTTP body or Python)."""

    name: str = Field(description="Adapter name the result is registered under, e.g. 'sentiment'.")
    base_model: str = Field("default", description="'default' (the served SmolLM2) or a checkpoint directory.")
    cache_dir: Path = Field(Path.home() / ".cache" / "llmaas", description="Converted-model cache.")
    train_files: list[str] = Field(min_length=1, description="JSONL files: {messages: [...]} or {prompt, completion}.")
    validation_file: str | None = Field(None, description="JSONL validation set; else validation_split of train.")
    validation_split: float = Field(0.1, ge=0, lt=1, description="Share of train rows held out when no file.")
    format: Literal["auto", "chat", "prompt_completion"] = Field("auto", description="Row format; auto per row.")
    on_bad_line: Literal["error", "skip"] = Field("error", description="Malformed lines: fail, or skip and count.")
    max_length: int = Field(512, ge=8, description="Tokens per row; longer rows are errors (or skipped).")
    lora: LoRASettings = Field(default_factory=LoRASettings)
    epochs: int = Field(1, ge=1, le=100)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    batch_size: int = Field(8, ge=1, description="Rows per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seed: int = Field(0)
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Also checkpoint every K optimizer steps.")
    storage_root: str = Field(str(Path.home() / ".cache" / "llmaas" / "storage"),
                              description="Where checkpoints, adapters and job records are written: a path or an "
                                          "s3:// / gs:// URI.")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    fault_injection_step: int | None = Field(
        None, ge=1, description="Drills: worker rank 1's process (rank 0 when alone) is killed once at this "
                                "optimizer step; the job resumes from its last checkpoint.")
    trace_rows: bool = Field(False, description="Drills: every worker logs the rows of each micro-batch it trains "
                                                "(`rows` events), so a test can prove each row is seen once per epoch.")

    @field_validator("storage_root", mode="before")
    @classmethod
    def _root_as_text(cls, v: object) -> object:
        return str(v) if isinstance(v, Path) else v  # a path or an s3:// / gs:// URI, kept as written

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = name_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _labels_for_classification(self) -> FineTuneJob:
        wants = {"accuracy", "macro_f1"} & set(self.eval.metrics)
        if wants and not self.eval.labels:
            raise ValueError(f"eval.labels is required for {', '.join(sorted(wants))}")
        grammar = [m for m in self.eval.metrics if m.endswith("_grammar")]
        if grammar and self.eval.json_schema is None:
            raise ValueError(f"eval.json_schema is required for {', '.join(sorted(grammar))}")
        if self.eval.json_schema is not None:  # checked now, not after the training it would be scored on
            check_json_schema(self.eval.json_schema)
        return self
