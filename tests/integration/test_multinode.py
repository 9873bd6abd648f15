"""The same app on a two-node Ray cluster (both nodes on this machine)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "training" / "examples" / "sentiment"
ROOT = Path(__file__).resolve().parents[2]


def test_two_nodes_spread_replicas_share_adapters_and_train(tiny_chat_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((EXAMPLES / "train.jsonl").read_text().splitlines()[:32]) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "integration" / "multinode_driver.py"),
                           str(tiny_chat_dir), str(tmp_path / "storage"), str(data)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, proc.stderr[-4000:]
    got = json.loads(line[len("RESULT"):])
    assert got["nodes"] == 2
    assert got["replica_nodes"] == 2  # one LLMServer replica per node
    assert got["adapter_ok"] == 10  # both replicas load the adapter from the shared storage root
    assert got["job"] == "succeeded", got["error"]
    assert got["worker_nodes"] == 2  # SPREAD: one training worker per node
