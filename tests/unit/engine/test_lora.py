"""Multi-LoRA: greedy output with adapters equals PEFT's, also when one batch mixes adapters and base rows."""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch

from llmaas.engine import AdapterError, EngineConfig, InvalidRequestError, LLMEngine, SamplingParams
from llmaas.engine.lora import SlotTable
from tests.models import ALL_LORA_MODULES, make_peft_adapter, tiny_llama

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
ALL_MODULES = ALL_LORA_MODULES


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=0)


def make_adapter(base, path, seed: int, r: int = 8, targets=ALL_MODULES, **extra) -> str:
    return make_peft_adapter(base, path, seed, r, targets, **extra)


def peft_greedy(base, adapter_dir, prompt: list[int], max_new: int = 16) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False)
    return out[0, len(prompt):].tolist()


def base_greedy(base, prompt: list[int], max_new: int = 16) -> list[int]:
    ids = torch.tensor([prompt])
    return base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False)[0, len(prompt):].tolist()


def engine_for(base, **overrides) -> LLMEngine:
    cfg = dict(max_model_len=256, num_kv_blocks=128, block_size=4, max_loras=4, max_lora_rank=16)
    cfg.update(overrides)
    return LLMEngine(copy.deepcopy(base), EngineConfig(**cfg))


@pytest.mark.parametrize("targets, extra", [
    (ALL_MODULES, {}),
    (["q_proj", "v_proj"], {}),
    (ALL_MODULES, {"use_rslora": True}),
])
def test_adapter_greedy_equals_peft(base, tmp_path, targets, extra):
    path = make_adapter(base, tmp_path / "a", seed=1, targets=targets, **extra)
    prompt = list(range(3, 23))
    expected = peft_greedy(base, path, prompt)
    assert expected != base_greedy(base, prompt)  # the adapter really changes the output
    engine = engine_for(base)
    engine.add_lora("a", path)
    assert engine.generate([prompt], GREEDY, ["a"])[0] == expected


def test_mixed_batch_of_four_adapters_and_base_rows(base, tmp_path):
    paths = [make_adapter(base, tmp_path / f"a{i}", seed=10 + i, r=4 + 4 * (i % 2)) for i in range(4)]
    prompts = [[(7 * i + j) % 256 for j in range(5 + 3 * i)] for i in range(6)]
    loras = ["a0", None, "a1", "a2", None, "a3"]
    expected = [peft_greedy(base, paths[int(l[1])], p) if l else base_greedy(base, p)
                for p, l in zip(prompts, loras)]
    engine = engine_for(base)
    for i, path in enumerate(paths):
        engine.add_lora(f"a{i}", path)
    assert engine.generate(prompts, GREEDY, loras) == expected


def test_more_adapters_than_slots_wait_and_evict(base, tmp_path):
    paths = [make_adapter(base, tmp_path / f"b{i}", seed=20 + i) for i in range(3)]
    prompt = list(range(10, 20))
    expected = [peft_greedy(base, p, prompt) for p in paths]
    engine = engine_for(base, max_loras=2)
    for i, path in enumerate(paths):
        engine.add_lora(f"b{i}", path)
    assert engine.generate([prompt] * 3, GREEDY, ["b0", "b1", "b2"]) == expected
    assert engine.generate([prompt], GREEDY, ["b0"]) == [expected[0]]  # reloaded after eviction


def test_unknown_adapter_is_rejected(base):
    with pytest.raises(InvalidRequestError, match="not loaded"):
        engine_for(base).add_request("x", [1, 2], GREEDY, lora="nope")


class _Bomb:
    def __reduce__(self):
        return (open, ("/tmp/llmaas-pickle-sentinel", "w"))


def test_pickle_adapter_refused_and_never_unpickled(base, tmp_path):
    import os

    sentinel = "/tmp/llmaas-pickle-sentinel"
    if os.path.exists(sentinel):
        os.remove(sentinel)
    d = tmp_path / "evil"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                        "target_modules": ["q_proj"]}))
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Bomb()))
    with pytest.raises(AdapterError, match="pickle"):
        engine_for(base).add_lora("evil", str(d))
    assert not os.path.exists(sentinel)


def test_damaged_safetensors_are_refused_as_the_adapters_fault(base, tmp_path):
    path = Path(make_adapter(base, tmp_path / "damaged", seed=3))
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])  # truncated: the header promises more than is there
    with pytest.raises(AdapterError, match="cannot be read"):
        engine_for(base).add_lora("damaged", str(path))
    raw = {"adapter_config.json": (path / "adapter_config.json").read_bytes(), "adapter_model.safetensors": b"\0" * 64}
    with pytest.raises(AdapterError, match="cannot be read"):  # bytes from object storage, as the server passes
        engine_for(base).add_lora("damaged-bytes", raw)


def test_rank_over_max_and_wrong_base_are_refused(base, tmp_path):
    big = make_adapter(base, tmp_path / "big", seed=3, r=32)
    with pytest.raises(AdapterError, match="max_lora_rank"):
        engine_for(base).add_lora("big", big)
    other = tiny_llama(seed=0, hidden_size=32, intermediate_size=64)
    wrong = make_adapter(other, tmp_path / "wrong", seed=3)
    with pytest.raises(AdapterError, match="another base model"):
        engine_for(base).add_lora("wrong", wrong)


def test_non_finite_adapter_weights_are_refused(base, tmp_path):
    """Refused at load with a clear error, rather than served as NaN answers to the adapter's own requests."""
    from safetensors.torch import load_file, save_file

    path = Path(make_adapter(base, tmp_path / "nan", seed=3))
    weights = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in weights if ".lora_B." in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN or infinite"):
        engine_for(base).add_lora("nan", str(path))


@pytest.mark.parametrize("ops, resident", [
    ([("acquire", "a"), ("acquire", "b"), ("release", "a"), ("acquire", "c")], {"b", "c"}),  # LRU unpinned evicted
    ([("acquire", "a"), ("release", "a"), ("acquire", "b"), ("release", "b"), ("acquire", "a"), ("acquire", "c")],
     {"a", "c"}),
])
def test_slot_table_lru(ops, resident):
    table = SlotTable(2)
    for op, name in ops:
        getattr(table, op)(name)
    assert {n for n in "abc" if table.slot_of(n) is not None} == resident


def test_slot_table_never_evicts_pinned():
    table = SlotTable(1)
    table.acquire("a")
    assert not table.can_acquire("b")
    table.release("a")
    assert table.can_acquire("b")


def test_prefix_cache_never_shares_blocks_across_adapters(base, tmp_path):
    path = make_adapter(base, tmp_path / "p", seed=5)
    prompt = list(range(3, 43))
    engine = engine_for(base)
    engine.add_lora("p", path)
    assert engine.generate([prompt], GREEDY) == [base_greedy(base, prompt)]
    assert engine.generate([prompt], GREEDY, ["p"]) == [peft_greedy(base, path, prompt)]
    assert engine.block_manager.num_cached_tokens == 0  # same tokens, other adapter: other K/V
    assert engine.generate([prompt], GREEDY, ["p"]) == [peft_greedy(base, path, prompt)]
    assert engine.block_manager.num_cached_tokens == 36


@pytest.mark.parametrize("segments, padded", [
    ([(0, 2, 1), (2, 5, 0), (5, 6, 2)], True),  # decode-like: even segments take the padded SGMV path
    ([(1, 2, 0), (2, 3, 1)], True),  # row 0 has no adapter; 2 of 3 slots: slot buffers used in place
    ([(0, 3, 2), (3, 4, 0)], True),  # slot 1 unused: an all-padding entry
    ([(0, 40, 0), (40, 41, 2), (41, 42, 1)], False),  # skewed prefill: the per-segment loop
    ([(0, 6, 2)], False),  # one adapter
])
def test_segmented_lora_equals_a_naive_per_row_reference(segments, padded):
    from llmaas.engine.lora import AdapterWeights, LoRABatch, LoRAPool

    g = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (8, 12)}
    pool = LoRAPool(3, 4, 1, shapes, torch.float32, "cpu")
    for slot, rank in enumerate((4, 2, 3)):
        a, b = torch.randn(rank, 8, generator=g), torch.randn(12, rank, generator=g)
        pool.write(slot, AdapterWeights(f"a{slot}", rank, 0.5 + slot, {(0, "q_proj"): (a, b)}))
    rows = max(end for _, end, _ in segments) + 2  # trailing base rows
    x, y = torch.randn(rows, 8, generator=g), torch.randn(rows, 12, generator=g)
    expected = y.clone()
    for start, end, slot in segments:
        for r in range(start, end):  # y[r] += scale * B (A x[r])
            expected[r] += pool.scale[slot] * (pool.b["q_proj"][0, slot] @ (pool.a["q_proj"][0, slot] @ x[r]))
    batch = pool.prepare(LoRABatch(segments), "cpu")
    assert bool(batch.max_len) == padded
    torch.testing.assert_close(pool.apply(y.clone(), x, 0, "q_proj", batch), expected)


def test_padded_layout_gathers_the_slots_when_few_are_in_use():
    from llmaas.engine.lora import LoRABatch, LoRAPool

    pool = LoRAPool(8, 4, 1, {"q_proj": (8, 12)}, torch.float32, "cpu")
    assert pool.prepare(LoRABatch([(0, 1, 5), (1, 2, 3)]), "cpu").slots.tolist() == [5, 3]
    assert pool.prepare(LoRABatch([(s, s + 1, s) for s in range(4)]), "cpu").slots is None  # 4 of 8: in place


@pytest.mark.parametrize("segments", [[(0, 2, 1), (2, 5, 0), (5, 6, 2)], [(0, 40, 0), (40, 41, 2), (41, 42, 1)]])
def test_grouped_projections_equal_one_at_a_time(segments):
    """q/k/v share one stacked A matmul; each output must equal its own apply (and the naive reference)."""
    from llmaas.engine.lora import AdapterWeights, LoRABatch, LoRAPool

    g = torch.Generator().manual_seed(1)
    shapes = {"q_proj": (8, 12), "k_proj": (8, 4), "v_proj": (8, 4)}
    pool = LoRAPool(3, 4, 2, shapes, torch.float32, "cpu")
    assert ("q_proj", "k_proj", "v_proj") in pool.a_groups
    for slot, rank in enumerate((4, 2, 3)):
        weights = {(layer, m): (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g))
                   for layer in range(2) for m, (i, o) in shapes.items()}
        pool.write(slot, AdapterWeights(f"a{slot}", rank, 0.5 + slot, weights))
    rows = max(end for _, end, _ in segments) + 1
    x = torch.randn(rows, 8, generator=g)
    ys = [torch.randn(rows, o, generator=g) for _, o in shapes.values()]
    expected = [y.clone() for y in ys]
    for y, m in zip(expected, shapes):
        for start, end, slot in segments:
            for r in range(start, end):
                y[r] += pool.scale[slot] * (pool.b[m][1, slot] @ (pool.a[m][1, slot] @ x[r]))
    batch = pool.prepare(LoRABatch(segments), "cpu")
    got = [y.clone() for y in ys]
    pool.apply_group(got, x, 1, ("q_proj", "k_proj", "v_proj"), batch)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_prefix_cache_is_shared_only_within_a_salt(base):
    """engine.prefix_cache_scope: tenant salts each tenant's hash chains, so equal prompts of two tenants never
    hit each other's blocks (no timing side channel); the same tenant still reuses its own."""
    prompt = list(range(3, 43))
    engine = engine_for(base)
    expected = base_greedy(base, prompt)

    def run(request_id: str, salt: str | None) -> list[int]:
        engine.add_request(request_id, prompt, GREEDY, cache_salt=salt)
        out: list[int] = []
        while engine.has_unfinished():
            out += [t for o in engine.step() for t in o.new_token_ids]
        return out

    assert run("alice-1", "alice") == expected
    assert run("bob-1", "bob") == expected
    assert engine.block_manager.num_cached_tokens == 0  # same tokens, other tenant: nothing reused
    assert run("alice-2", "alice") == expected
    assert engine.block_manager.num_cached_tokens == 36  # 9 full blocks of 4 from alice's first request
