"""Two Ray nodes on this machine (ray.cluster_utils.Cluster): replicas spread, shared storage, training spreads.

Run by test_multinode.py in its own process, so it owns its own Ray cluster. Prints one RESULT line.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(tiny_chat_dir: str, storage: str, data_file: str) -> None:
    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from llmaas.deployments.config import AppConfig
    from llmaas.deployments.llm_server import LLMServer
    from llmaas.deployments.router import Router
    from llmaas.deployments.tokenizer import Tokenizer
    from llmaas.training import FineTuneJob, run_job
    from llmaas.training.store import JobStore
    from tests.models import make_peft_adapter

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    port = 18000 + int(time.time()) % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = AppConfig.model_validate({"model": {"source": tiny_chat_dir}, "storage_root": storage,
                                    "engine": {"torch_threads": 1, "kv_cache_memory_gb": 0.05}})
    app = Router.bind(Tokenizer.bind(cfg), LLMServer.options(
        num_replicas=2, ray_actor_options={"num_cpus": 1}, placement_group_bundles=[{"CPU": 1}],
        placement_group_strategy="STRICT_SPREAD").bind(cfg), cfg)
    serve.run(app, name="mn", route_prefix="/")
    url = f"http://127.0.0.1:{port}"

    from transformers import AutoModelForCausalLM

    adapter = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), Path(storage) / "src", seed=7)
    httpx.post(f"{url}/v1/adapters", json={"name": "shared", "path": adapter, "promote": True},
               timeout=60).raise_for_status()
    llm = serve.get_deployment_handle("LLMServer", app_name="mn")
    replica_nodes = {llm.stats.remote().result()["node_id"] for _ in range(20)}
    ok = 0
    for _ in range(10):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "shared", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        ok += r.status_code == 200 and r.json()["model"] == "shared@1"
    serve.shutdown()

    job = FineTuneJob(name="mn", base_model=tiny_chat_dir, train_files=[data_file], validation_split=0.0,
                      batch_size=8, num_workers=2, cpus_per_worker=1, placement_strategy="SPREAD",
                      storage_root=storage, max_length=128, eval={"metrics": ["loss"]})
    record = run_job(job, "ftjob-multinode")
    worker_nodes = {e["data"]["node_id"] for e in JobStore(storage).events("ftjob-multinode")
                    if e["type"] == "worker"}
    print("RESULT" + json.dumps({"nodes": len(nodes), "replica_nodes": len(replica_nodes), "adapter_ok": ok,
                                 "job": record.status, "worker_nodes": len(worker_nodes & nodes),
                                 "error": record.error}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
