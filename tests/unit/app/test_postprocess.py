"""Incremental detokenization and stop strings, with real tokenizers (byte-level BPE and SentencePiece-style)."""
from __future__ import annotations

import pytest

from llmaas.app.postprocess import IncrementalDetokenizer, StopMatcher

TEXTS = [
    "Hello world, how are you?",
    "  leading spaces and  double  spaces",
    "emoji 😀🎉 and family 👨‍👩‍👧 mixed",
    "中文字符测试，日本語のテキスト、한국어",
    "café naïve – “quotes” ©",
    "\nnew\nlines\n\n",
]


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A SentencePiece-style (Metaspace '▁', byte fallback) BPE tokenizer trained in process."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer(unk_token="<unk>", fuse_unk=True)
    sp.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300,
                           special_tokens=["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def stream_decode(tokenizer, prompt_ids, ids, chunk: int) -> str:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    text = "".join(detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk))
    return text + detok.flush()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_byte_level_bpe_streams_exactly(default_tokenizer, text, chunk):
    prompt = default_tokenizer.encode("Say:")
    ids = default_tokenizer.encode(text)
    assert stream_decode(default_tokenizer, prompt, ids, chunk) == default_tokenizer.decode(ids)


@pytest.mark.parametrize("text", ["Hello world, how are you?", "the quick brown fox", "  spaced  out"])
def test_sentencepiece_spaces_survive_streaming(sentencepiece_tokenizer, text):
    tok = sentencepiece_tokenizer
    prompt = tok.encode("the lazy dog")
    ids = tok.encode(" " + text)
    full = tok.decode(prompt + ids)
    assert tok.decode(prompt) + stream_decode(tok, prompt, ids, 1) == full


def test_partial_utf8_is_held_back(default_tokenizer):
    ids = default_tokenizer.encode("😀")
    assert len(ids) > 1  # the emoji spans several byte tokens
    detok = IncrementalDetokenizer(default_tokenizer, [])
    pieces = [detok.add([t]) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀"


@pytest.mark.parametrize("stops, chunks, emitted, stopped", [
    ([], ["ab", "cd"], "abcd", False),
    (["cd"], ["ab", "cd", "ef"], "ab", True),
    (["cd"], ["abc", "d"], "ab", True),  # stop split across chunks
    (["cd"], ["abc", "x"], "abcx", False),  # held-back 'c' released
    (["\n\n"], ["one\n", "\ntwo"], "one", True),
    (["xyz", "b"], ["aab", "c"], "aa", True),  # earliest match wins
    (["END"], ["E", "N", "D!"], "", True),
])
def test_stop_matcher(stops, chunks, emitted, stopped):
    m = StopMatcher(stops)
    out = "".join(m.feed(c) for c in chunks)
    out += m.flush()
    assert (out, m.stopped) == (emitted, stopped)
