"""Incremental detokenization with SmolLM2's real tokenizer: the pieces join to the one-shot decode
(non-ASCII, emoji, whitespace), and stop strings cut the text without ever being emitted."""
from __future__ import annotations

import pytest

from services.gateway.detokenizer import Detokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "The café's crème brûlée costs 3½ € — très cher.",
    "日本語のテキストです。中文也可以。",
    "emoji: 🚀🔥👍🏽 and a family 👨‍👩‍👧 in one grapheme!",
    "mixed\n\n  spaces\ttabs   and   runs  ",
    "don't won't it's , . ; ( ) [ ]",
    "def f(x):\n    return x ** 2  # squared\n",
    " leading space and trailing space ",
    "Ünïcödé ñ ß ø Ωμέγα русский",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_path)


def feed(tokenizer, ids: list[int], chunk: int = 1, stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    """Pieces the detokenizer returns when `ids` arrive `chunk` at a time, the last call final."""
    d = Detokenizer(tokenizer, stop)
    pieces = []
    for start in range(0, len(ids), chunk):
        pieces.append(d.add(ids[start:start + chunk], final=start + chunk >= len(ids)))
    return pieces, d


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_incremental_text_equals_one_shot_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text)
    pieces, _ = feed(tokenizer, ids, chunk)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces), "a half character is held back, never sent"


def test_special_tokens_are_skipped_and_a_final_empty_call_flushes(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nParis 🚀<|im_end|>")
    d = Detokenizer(tokenizer)
    text = "".join(d.add([t]) for t in ids) + d.add([], final=True)
    assert text == tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nParis 🚀"


def test_partial_utf8_is_held_until_the_character_completes(tokenizer):
    ids = tokenizer.encode("🚀")
    assert len(ids) > 1, "the emoji is several byte tokens"
    d = Detokenizer(tokenizer)
    assert [d.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add(ids[-1:]) == "🚀"


def stop_cases() -> list[tuple[str, str]]:
    text = TEXTS[0]
    return [(text, "Paris"), (text, "capital of"), (text, "o, w"), (text, "!"), (text, "Hello"),
            (TEXTS[3], "🔥👍"), (TEXTS[3], "🏽 and"), (TEXTS[1], "me br"), (TEXTS[4], "\n\n "),
            (TEXTS[6], "return x")]


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text,stop", stop_cases())
def test_stop_string_cuts_the_text_and_is_never_emitted(tokenizer, text, stop, chunk):
    ids = tokenizer.encode(text)
    pieces, d = feed(tokenizer, ids, chunk, stop=(stop, "zzz-never"))
    out = "".join(pieces)
    assert out == text[:text.index(stop)]
    assert d.stopped
    sent = ""
    for piece in pieces:                   # at no point has the client seen any of the stop string
        sent += piece
        assert stop not in sent and text.startswith(sent)


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    text = TEXTS[0]
    pieces, _ = feed(tokenizer, tokenizer.encode(text), stop=("Paris", "capital", "France"))
    assert "".join(pieces) == "Hello, world! The "


def test_only_the_last_characters_that_could_start_a_stop_string_are_held_back():
    class Chars:                           # one character per token: every boundary is tested
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    d = Detokenizer(Chars(), stop=("abc",))
    assert [d.add([ord(c)]) for c in "xabd"] == ["", "", "x", "a"]    # len("abc") - 1 chars held
    assert d.add([ord("e")], final=True) == "bde", "the final call releases everything"
    d = Detokenizer(Chars(), stop=("abc",))
    assert "".join(d.add([ord(c)]) for c in "xxabxab") + d.add([ord("c")], final=True) == "xxabx"
    assert d.add([ord("z")], final=True) == "", "nothing after a stop"


def test_no_stop_strings_means_no_hold_back(tokenizer):
    ids = tokenizer.encode("Hello there")
    d = Detokenizer(tokenizer)
    assert d.add(ids[:1]) == "Hello"
