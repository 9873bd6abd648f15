"""serve.get_app_handle() from another Ray driver gets the same typed results as HTTP."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

DRIVER = textwrap.dedent("""
    import json, ray
    from ray import serve
    ray.init(address="auto", log_to_driver=False)
    handle = serve.get_app_handle("llmaas")
    req = {"model": "base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
           "temperature": 0, "ignore_eos": True}
    resp = handle.chat.remote(req).result()
    chunks = list(handle.options(stream=True).chat_stream.remote(req))
    comp = handle.completions.remote({"model": "base", "prompt": "hi", "max_tokens": 3}).result()
    try:
        handle.chat.remote({"model": "base", "messages": []}).result()
        error = None
    except Exception as exc:
        error = type(exc).__name__ + ": " + str(exc)
    try:  # the operator's limits hold on the handle as on HTTP (max_messages: 256 by default)
        handle.chat.remote({"model": "base", "messages": [{"role": "user", "content": "x"}] * 300}).result()
        too_many = None
    except Exception as exc:
        too_many = type(exc).__name__ + ": " + str(exc)
    print("RESULT" + json.dumps({"too_many": too_many,
        "type": type(resp).__name__, "content": resp.choices[0].message.content,
        "usage": resp.usage.completion_tokens,
        "chunk_types": sorted({type(c).__name__ for c in chunks}),
        "streamed": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "completion_type": type(comp).__name__, "error": error}))
""")


def test_handle_from_separate_driver_matches_http(serve_app, client):
    proc = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=180)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, proc.stderr[-3000:]
    got = json.loads(line[len("RESULT"):])
    http = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert got["type"] == "ChatCompletionResponse"
    assert got["content"] == http.choices[0].message.content == got["streamed"]
    assert got["usage"] == 6
    assert got["chunk_types"] == ["ChatCompletionChunk"]
    assert got["completion_type"] == "CompletionResponse"
    assert got["error"] and "messages" in got["error"]
    assert got["too_many"] and "at most 256 messages" in got["too_many"]
