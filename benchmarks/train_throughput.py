"""Fine-tuning throughput: our Ray Train job vs a plain single-process PEFT + HF Trainer loop, same run.

    python -m llmaas.benchmarks.train_throughput --workers 2 --rows 192 --batch-size 8

Same data (the shipped sentiment example), same base model, same LoRA config; both
report trained (non-pad) tokens per second of training loop time, excluding start-up.
Our figure comes from the job's own metrics; global batch = workers x batch-size in both.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from llmaas.benchmarks.common import print_table, save

EXAMPLE = Path(__file__).resolve().parents[1] / "training" / "examples" / "sentiment" / "train.jsonl"


def hf_trainer_tok_s(base_path: str, examples, global_batch: int, steps: int, threads: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from llmaas.training.data import pad_batch

    torch.set_num_threads(threads)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
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
            output_dir=out, per_device_train_batch_size=global_batch, max_steps=steps, learning_rate=1e-3,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
            remove_unused_columns=False), train_dataset=rows, data_collator=collate, callbacks=[Clock()])
        trainer.train()
    tokens = sum(len(r["input_ids"]) for r in rows[:steps * global_batch])
    return tokens / (Clock.end - Clock.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    args = p.parse_args()

    import ray
    from transformers import AutoTokenizer

    from llmaas.app.config import ModelSettings
    from llmaas.app.model_source import resolve_model
    from llmaas.training import FineTuneJob, run_job
    from llmaas.training.data import read_jsonl, tokenize_rows
    from llmaas.training.store import JobStore

    base = resolve_model(ModelSettings())
    tok = AutoTokenizer.from_pretrained(base.path)
    data_dir = Path(tempfile.mkdtemp(prefix="llmaas-train-bench-"))
    train = data_dir / "train.jsonl"
    train.write_text("\n".join(EXAMPLE.read_text().splitlines()[:args.rows]) + "\n")
    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    job = FineTuneJob(name="bench", train_files=[str(train)], validation_split=0.0, batch_size=args.batch_size,
                      num_workers=args.workers, max_length=128, storage_root=data_dir / "store",
                      eval={"metrics": ["loss"]})
    record = run_job(job, "ftjob-bench")
    assert record.status == "succeeded", record.error
    metrics = [e["data"] for e in JobStore(data_dir / "store").events("ftjob-bench") if e["type"] == "metrics"]
    ours = metrics[-1]["tokens_per_s"]
    steps = len(metrics)
    ray.shutdown()
    examples, _ = tokenize_rows(tok, read_jsonl(train)[0], 128, "error")
    hf = hf_trainer_tok_s(base.path, examples, args.workers * args.batch_size, steps, threads=args.workers)
    rows = [{"runner": f"llmaas job ({args.workers} Ray Train workers, DDP)", "tokens_per_s": ours},
            {"runner": "PEFT + HF Trainer, 1 process", "tokens_per_s": hf}]
    print_table(rows, ["runner", "tokens_per_s"])
    print(f"ratio ours / HF Trainer: {ours / hf:.3f}  ({steps} optimizer steps, global batch "
          f"{args.workers * args.batch_size})")
    print("saved", save("train_throughput", {"args": vars(args), "rows": rows, "ratio": ours / hf,
                                             "steps": steps, "job_metrics": json.loads(json.dumps(metrics[-1]))}))


if __name__ == "__main__":
    main()
