"""One bad request must not hurt anyone else: values that would overflow the engine, fan-out, unbounded bodies
and ids are refused at the edge with an OpenAI-shaped 4xx while other streams on the same replica finish whole."""
from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

MSG = [{"role": "user", "content": "hi"}]
HUGE = 1 << 70

OVERFLOWS = [  # (route, body, param): each once killed or hung the engine, or would
    ("/v1/chat/completions", {"top_k": 9223372036854775808}, "top_k"),
    ("/v1/chat/completions", {"seed": 18446744073709551616}, "seed"),
    ("/v1/chat/completions", {"seed": -HUGE}, "seed"),
    ("/v1/chat/completions", {"max_tokens": HUGE}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 1 << 40}, "max_completion_tokens"),
    ("/v1/chat/completions", {"n": 10**30}, "n"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": HUGE}, "top_logprobs"),
    ("/v1/chat/completions", {"stop": "x" * 1000}, "stop"),
    ("/v1/completions", {"prompt": [HUGE]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3, -HUGE]]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": HUGE}, "logprobs"),
]


def _body(route: str, extra: dict) -> dict:
    base = {"model": "base", "max_tokens": 4} if route == "/v1/completions" else {"model": "base", "messages": MSG,
                                                                                  "max_tokens": 4}
    if route == "/v1/completions" and "prompt" not in extra:
        base["prompt"] = "hi"
    return {**base, **extra}


def _stream_text(base_url: str, seed: int) -> tuple[str, str | None]:
    """A long seeded stream: (its text, its finish_reason)."""
    body = {"model": "base", "messages": [{"role": "user", "content": f"story {seed}"}], "max_tokens": 120,
            "temperature": 0.8, "seed": seed, "ignore_eos": True, "stream": True}
    text, finish = [], None
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    return "".join(text), finish


def test_values_that_would_overflow_the_engine_get_400_while_streams_run(base_url, serve_app):
    expected = [_stream_text(base_url, seed) for seed in (1, 2)]  # alone, before any bad request
    with cf.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(_stream_text, base_url, seed) for seed in (1, 2)]
        time.sleep(0.5)  # the streams are under way on the same replica
        for route, extra, param in OVERFLOWS:
            r = httpx.post(f"{base_url}{route}", json=_body(route, extra), timeout=30)
            assert r.status_code == 400, (extra, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
        got = [f.result(timeout=120) for f in streams]
    assert got == expected  # whole, and token-identical to the run without the bad requests
    assert all(finish == "length" for _, finish in got)
    ok = httpx.post(f"{base_url}/v1/chat/completions", json=_body("/v1/chat/completions", {}), timeout=30)
    assert ok.status_code == 200  # the engine lives


def test_fan_out_is_capped_before_any_work(base_url, serve_app):
    started = time.monotonic()
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "base", "prompt": ["hi"] * 20000, "n": 8,
                                                       "max_tokens": 4}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert "160000 choices; at most 8" in r.json()["error"]["message"]
    assert time.monotonic() - started < 10  # refused up front, not after tokenizing 20,000 prompts
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "base", "prompt": ["hi"] * 9, "max_tokens": 1},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "base", "prompt": ["hi"] * 4, "n": 2,
                                                       "max_tokens": 1}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 8


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/files"])
def test_a_chunked_body_is_capped_on_the_bytes_read(base_url, serve_app, route):

    upload = route == "/v1/files"
    head, tail = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n',
                  b'\r\n--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--b--\r\n') \
        if upload else (b'{"model": "base", "messages": [{"role": "user", "content": "', b'"}]}')

    def body():  # no Content-Length: httpx sends it chunked
        yield head
        for _ in range(16 * 16):  # 16 MB of well-formed content
            yield b'{"prompt": "a", "completion": "b"}\n' * 1820 if upload else b"x" * 65536
        yield tail

    headers = {"content-type": "multipart/form-data; boundary=b" if upload else "application/json"}
    r = httpx.post(f"{base_url}{route}", content=body(), headers=headers, timeout=60)
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "body_too_large"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", [
    "/v1/files/file-" + "a" * 300,
    "/v1/fine_tuning/jobs/ftjob-" + "a" * 300,
    "/v1/fine_tuning/jobs/ftjob-" + "a" * 300 + "/events",
    "/v1/fine_tuning/jobs/ftjob-" + "a" * 300 + "/checkpoints",
])
def test_over_long_ids_are_not_found(base_url, serve_app, path):
    r = httpx.get(f"{base_url}{path}", timeout=30)
    assert r.status_code == 404, r.text[:300]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
