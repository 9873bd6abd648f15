"""The LoRA fine-tuning recipe one Ray Train worker runs (torchtune-style: setup, _loss_step, train).

LoRA (Hu et al., 2021) via PEFT on the served base model: ``W0 x + (alpha / r) B A x``
with W0 frozen. DDP over the workers (gloo on CPU, NCCL on GPU) through
``ray.train.torch.prepare_model``; checkpoints each epoch (and every K steps) through
``ray.train.report`` so a lost worker resumes from the last one.

Data: the tokenized rows arrive once through the object store; each epoch deals one
seeded permutation of them round-robin to the workers. The plan is a pure function of
(seed, epoch, rank), so a resumed attempt skips exactly the micro-batches its
checkpoint already trained: every row is trained once per epoch, kill or no kill.
"""
from __future__ import annotations

import math
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from peft import LoraConfig, get_peft_model
from ray.experimental.tqdm_ray import tqdm
from transformers import AutoModelForCausalLM

from llmaas.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from llmaas.training.config import FineTuneJob
from llmaas.training.data import pad_batch
from llmaas.training.store import JobStore


def lr_at(step: int, total: int, job: FineTuneJob) -> float:
    """Learning rate after ``step`` optimizer steps: linear warm-up, then constant/linear/cosine decay."""
    warmup = int(total * job.warmup_ratio)
    if step < warmup:
        return job.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if job.lr_schedule == "linear":
        return job.learning_rate * max(0.0, 1.0 - progress)
    if job.lr_schedule == "cosine":
        return job.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return job.learning_rate


@dataclass(frozen=True)
class RecipeConfig:
    """What the driver hands every worker (Ray Train's ``train_loop_config`` carries it as {"recipe": ...})."""

    job: FineTuneJob
    job_id: str
    base_path: str  # the base model's checkpoint directory
    pad_id: int
    steps_per_epoch: int  # optimizer steps per epoch on each worker
    train_rows: ray.ObjectRef  # [(input_ids, labels)] of every training row, put once by the driver


class LoRAFineTuneRecipe:
    def __init__(self, config: RecipeConfig) -> None:
        self.job = config.job
        self.job_id = config.job_id
        self.rows: list[tuple[list[int], list[int]]] = ray.get(config.train_rows)  # (input_ids, labels)
        self.base_path = config.base_path
        self.pad_id = config.pad_id
        self.steps_per_epoch = config.steps_per_epoch
        self.store = JobStore(self.job.storage_root)  # events go where the driver's go
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()

    # ----- setup -----
    def setup(self) -> None:
        torch.manual_seed(self.job.seed)
        self._setup_model()
        self._setup_optimizer()
        self.state = TrainerState()
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.state = load_checkpoint(Path(d), self.peft_model, self.optimizer)
            self._event("resumed", f"resumed from checkpoint at step {self.state.global_step}",
                        {"step": self.state.global_step})
        self.resumed_from = self.state.global_step  # 0 for a fresh start: names this attempt in `rows` events

    def _setup_model(self) -> None:
        base = AutoModelForCausalLM.from_pretrained(self.base_path, use_safetensors=True, dtype=torch.float32)
        lora = self.job.lora
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
        self.peft_model = get_peft_model(base, cfg)
        self.model = ray.train.torch.prepare_model(self.peft_model)  # DDP when world > 1

    def _setup_optimizer(self) -> None:
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.job.learning_rate, weight_decay=0.0)

    # ----- one step -----
    def _loss_step(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over label tokens. ids, labels, mask: [B, S]."""
        logits = self.model(input_ids=ids, attention_mask=mask).logits  # [B, S, V]
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)

    # ----- data -----
    def _epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """Every worker's micro-batches of ``epoch`` (row indices), by rank: one seeded permutation per epoch,
        dealt round-robin, each worker cut to the same number of micro-batches (DDP steps in lockstep)."""
        job = self.job
        order = list(range(len(self.rows)))
        random.Random(f"{job.seed}:{epoch}").shuffle(order)
        micro = self.steps_per_epoch * job.grad_accum
        plan = []
        for rank in range(self.world):
            mine = order[rank::self.world][:len(self.rows) // self.world]
            plan.append([mine[i:i + job.batch_size] for i in range(0, len(mine), job.batch_size)][:micro])
        return plan

    # ----- loop -----
    def train(self) -> None:
        self._event("worker", f"rank {self.rank} on node {self.node_id[:8]}", {"rank": self.rank,
                                                                              "node_id": self.node_id},
                    all_ranks=True)
        job = self.job
        total = self.steps_per_epoch * job.epochs
        bar = None
        if self.rank == 0:
            bar = tqdm(total=total, desc=f"fine-tune {job.name}", unit="step")
            bar.update(self.state.global_step)  # a resumed run starts where its checkpoint was
        device = next(self.peft_model.parameters()).device
        start = time.perf_counter()
        tokens_at_start = self.state.tokens_seen
        for epoch in range(self.state.epoch, job.epochs):
            self.model.train()
            plan, losses = self._epoch_plan(epoch), []
            first = self.state.step_in_epoch * job.grad_accum if epoch == self.state.epoch else 0
            for i in range(first, len(plan[self.rank])):  # from the first micro-batch the checkpoint has not seen
                rows = plan[self.rank][i]
                if job.trace_rows:
                    self._event("rows", f"rank {self.rank} micro-batch {i}", {
                        "epoch": epoch, "step": self.state.global_step + 1, "rank": self.rank, "rows": rows,
                        "attempt_from": self.resumed_from}, all_ranks=True)
                batch = {"input_ids": [self.rows[r][0] for r in rows], "labels": [self.rows[r][1] for r in rows]}
                ids, labels, mask = (t.to(device) for t in pad_batch(batch, self.pad_id))
                loss = self._loss_step(ids, labels, mask) / job.grad_accum
                loss.backward()
                losses.append(loss.item() * job.grad_accum)
                # every worker's tokens of this micro-batch index (the plan is known to all), not ours x world
                self.state.tokens_seen += sum(len(self.rows[r][0]) for p in plan if i < len(p) for r in p[i])
                if (i + 1) % job.grad_accum:
                    continue
                self._optimizer_step(total)
                self._maybe_inject_fault()
                metrics = {"epoch": epoch, "step": self.state.global_step, "train_loss": sum(losses) / len(losses),
                           "lr": self.optimizer.param_groups[0]["lr"],
                           "tokens_per_s": (self.state.tokens_seen - tokens_at_start) / (time.perf_counter() - start)}
                losses = []
                if bar is not None:
                    bar.update(1)
                    bar.set_description(f"fine-tune {job.name} loss {metrics['train_loss']:.4f}")
                self._event("metrics", f"step {metrics['step']}/{total} loss {metrics['train_loss']:.4f}", metrics)
                every = job.checkpoint_every_steps
                if every and self.state.global_step % every == 0 and self.state.step_in_epoch < self.steps_per_epoch:
                    self._report(metrics, checkpoint=True)
            self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
            self.state.final = self.state.epoch == job.epochs
            self._report({"epoch": epoch, "step": self.state.global_step}, checkpoint=True)
        if bar is not None:
            bar.close()

    def _optimizer_step(self, total: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.state.global_step, total, self.job)
        torch.nn.utils.clip_grad_norm_([p for p in self.peft_model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.state.step_in_epoch += 1

    def _maybe_inject_fault(self) -> None:
        step = self.job.fault_injection_step
        if step is None or self.state.global_step != step or self.rank != min(1, self.world - 1):
            return
        if self.store.claim_once(self.job_id, "fault_injected"):  # once per job: the resumed attempt trains on
            # Ray Train's controller takes reported checkpoints when it polls the workers (every 2 s): waiting
            # past a poll makes the drill deterministic, the kill lands after the last checkpoint was taken.
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)  # a dead process, as a lost node or the OOM killer leaves it

    def _report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        if checkpoint and self.rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(Path(d), self.peft_model, self.optimizer, self.state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            self._event("checkpoint", f"checkpoint at step {self.state.global_step}",
                        {"step": self.state.global_step})
        else:
            ray.train.report(metrics)

    def _event(self, kind: str, message: str, data: dict[str, Any], all_ranks: bool = False) -> None:
        if self.rank != 0 and not all_ranks:
            return
        self.store.add_event(self.job_id, kind, message, data)


def train_loop_per_worker(config: dict[str, RecipeConfig]) -> None:
    recipe = LoRAFineTuneRecipe(config["recipe"])
    recipe.setup()
    recipe.train()
