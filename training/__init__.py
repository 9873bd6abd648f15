"""LoRA fine-tuning on Ray Train: config, data, recipe (per worker), evaluation, jobs, CLI."""
from llmaas.training.config import EvalSettings, FineTuneJob, LoRASettings
from llmaas.training.jobs import JobHandle, run_job, submit

__all__ = ["EvalSettings", "FineTuneJob", "JobHandle", "LoRASettings", "run_job", "submit"]
