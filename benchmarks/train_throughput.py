"""Fine-tuning throughput: our Ray Train job vs a plain single-process PEFT + HF Trainer loop, same run.

    python -m llmaas.benchmarks.train_throughput --workers 2 --rows 192 --batch-size 8

Same data (the shipped sentiment example), same base model, same LoRA config; both
report trained (non-pad) tokens per second of training loop time, excluding start-up;
global batch = workers x batch-size in both, one epoch, every row trained on once.
A warm-up round (one optimizer step each), then the two take turns for --repeats rounds;
medians, ranges and the ratio of the medians are reported. Ray runs only during our rounds.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from llmaas.benchmarks.common import add_repeats, interleave, print_versus, save, versus
from llmaas.engine import LORA_TARGET_MODULES

EXAMPLE = Path(__file__).resolve().parents[1] / "training" / "examples" / "sentiment" / "train.jsonl"


def hf_trainer(base_path: str, examples, global_batch: int, threads: int) -> dict:
    """One epoch over ``examples`` (a multiple of global_batch) with PEFT + HF Trainer in this process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from llmaas.training.data import pad_batch

    torch.set_num_threads(threads)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=list(LORA_TARGET_MODULES)))
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def collate(batch):
        ids, labels, mask = pad_batch({"input_ids": [b["input_ids"] for b in batch],
                                       "labels": [b["labels"] for b in batch]}, 0)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, *a, **k):
            Clock.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            Clock.end = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, args=TrainingArguments(
            output_dir=out, per_device_train_batch_size=global_batch, max_steps=len(rows) // global_batch,
            learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
            dataloader_num_workers=0, remove_unused_columns=False), train_dataset=rows, data_collator=collate,
            callbacks=[Clock()])
        trainer.train()
    tokens = sum(len(r["input_ids"]) for r in rows)
    return {"tok_s": tokens / (Clock.end - Clock.start), "tokens": tokens, "loop_s": Clock.end - Clock.start}


def llmaas_job(lines: list[str], examples, args, work: Path, job_id: str) -> dict:
    """One fine-tuning job on ``lines`` (tokenized: ``examples``), on a Ray instance of its own."""
    import ray

    from llmaas.training import FineTuneJob, run_job
    from llmaas.training.store import JobStore

    train = work / f"{job_id}.jsonl"
    train.write_text("\n".join(lines) + "\n")
    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    try:
        job = FineTuneJob(name="bench", train_files=[str(train)], validation_split=0.0, batch_size=args.batch_size,
                          num_workers=args.workers, max_length=128, storage_root=work / "store",
                          eval={"metrics": ["loss"]})
        record = run_job(job, job_id)
    finally:
        ray.shutdown()
    if record.status != "succeeded":
        raise RuntimeError(f"the fine-tuning job {job_id} {record.status}: {record.error}")
    metrics = [e["data"] for e in JobStore(work / "store").events(job_id) if e["type"] == "metrics"]
    if len(metrics) != len(lines) // (args.workers * args.batch_size):
        raise RuntimeError(f"{len(metrics)} optimizer steps, expected {len(lines)} rows / global batch")
    # Rank 0 reports tokens_per_s = tokens_seen / its loop time, and tokens_seen has counted rank 0's tokens x
    # world size (training/recipe.py), not what the ranks trained on: each trains on other rows. So only the loop
    # time is taken from the report (reported tokens / reported rate at the last step); the tokens are counted
    # here. With the row count a multiple of workers x batch-size, every worker trains on all rows / workers rows
    # of its share, so together they train on every row once: the sum over workers is the tokens of all rows,
    # whichever worker held which. (Where the recipe counts every worker's tokens, the two counts agree.)
    loop_s = record.trained_tokens / metrics[-1]["tokens_per_s"]
    tokens = sum(len(e.input_ids) for e in examples)
    return {"tok_s": tokens / loop_s, "tokens": tokens, "reported_tokens": record.trained_tokens,
            "loop_s": loop_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", type=int, default=192, help="a multiple of workers x batch-size")
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    add_repeats(p)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    global_batch = args.workers * args.batch_size
    if args.rows % global_batch:
        p.error(f"--rows {args.rows} is not a multiple of workers x batch-size ({global_batch}): every rank must "
                "train on its whole shard for the token count to be exact")

    from transformers import AutoTokenizer

    from llmaas.app.config import ModelSettings
    from llmaas.app.model_source import resolve_model
    from llmaas.training.data import read_jsonl, tokenize_rows

    base = resolve_model(ModelSettings())
    lines = EXAMPLE.read_text().splitlines()[:args.rows]
    work = Path(tempfile.mkdtemp(prefix="llmaas-train-bench-"))
    (work / "all.jsonl").write_text("\n".join(lines) + "\n")
    examples, _ = tokenize_rows(AutoTokenizer.from_pretrained(base.path), read_jsonl(work / "all.jsonl")[0], 128,
                                "error")  # as the job tokenizes them

    def rows(r: int) -> int:
        return global_batch if r == 0 else args.rows  # round 0 (warm-up): one optimizer step of the same shape

    ours, peer = f"llmaas job ({args.workers} Ray Train workers, DDP)", "PEFT + HF Trainer, 1 process"
    runs = interleave({
        ours: lambda r: llmaas_job(lines[:rows(r)], examples[:rows(r)], args, work, f"ftjob-bench-{r}"),
        peer: lambda r: hf_trainer(base.path, examples[:rows(r)], global_batch, threads=args.workers),
    }, args.repeats)
    row = versus(ours, [x["tok_s"] for x in runs[ours]], peer, [x["tok_s"] for x in runs[peer]])
    print_versus([row], args.repeats)
    print(f"{args.rows // global_batch} optimizer steps of global batch {global_batch}, {runs[peer][0]['tokens']} "
          "tokens per round (ours: the sum over all workers)")
    if not args.no_save:
        print("saved", save("train_throughput", {"args": vars(args), "rows": [row], "ratio": row["ratio"],
                                                 "steps": args.rows // global_batch, "runs": runs}))


if __name__ == "__main__":
    main()
