"""Sampling (greedy, seeds, top-k, top-p, temperature), `SamplingParams` validation, and stopping rules."""
from __future__ import annotations

import math

import pytest
import torch

from services.engine.sampling import SamplingParams, sample
from services.engine.sequence import FinishReason, Sequence
from services.engine.stopping import check_stop, truncate_at_stop

# A hand-made distribution: token i has probability PROBS[i] (sorted, no near-ties in the masses).
PROBS = [0.4, 0.3, 0.2, 0.1]
LOGITS = torch.tensor(PROBS).log()


def draw(logits: torch.Tensor, params: SamplingParams, seeds, step: int = 0) -> list[int]:
    """One token per seed from the same logits row (each row has its own generator)."""
    rows = logits.expand(len(seeds), -1).contiguous()
    return sample(rows, [params] * len(seeds), list(seeds), [step] * len(seeds))


def draw_steps(logits: torch.Tensor, params: SamplingParams, seed: int, num_steps: int) -> list[int]:
    """The tokens one request seeded `seed` would sample at steps 0..num_steps-1."""
    return [sample(logits.unsqueeze(0), [params], [seed], [step])[0] for step in range(num_steps)]


# ---- sample() ------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0)
    assert sample(logits, [greedy] * 8, list(range(8)), [0] * 8) == logits.argmax(dim=-1).tolist()


def test_top_k_1_equals_greedy_at_any_temperature():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=t, top_k=1) for t in (0.5, 1.0, 1.5, 3.0, 0.5, 1.0, 1.5, 3.0)]
    assert sample(logits, params, list(range(8)), [0] * 8) == logits.argmax(dim=-1).tolist()


def test_greedy_rows_and_sampled_rows_mix_in_one_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)] * 2
    tokens = sample(logits, params, [0, 3, 0, 3], [0] * 4)
    assert [tokens[0], tokens[2]] == logits[[0, 2]].argmax(dim=-1).tolist()


def test_same_seed_gives_same_tokens_and_different_seeds_differ():
    flat = torch.zeros(1000)
    params = SamplingParams(temperature=1.0)
    first = draw_steps(flat, params, seed=7, num_steps=20)
    assert draw_steps(flat, params, seed=7, num_steps=20) == first
    assert draw_steps(flat, params, seed=8, num_steps=20) != first
    assert len(set(first)) > 1, "successive steps of one request should draw fresh noise"


def test_seed_alone_decides_a_token_not_the_batch_it_is_in():
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=1.0)
    batched = sample(logits, [params] * 3, [11, 12, 13], [5, 6, 7])
    alone = [sample(logits[i:i + 1], [params], [11 + i], [5 + i])[0] for i in range(3)]
    assert batched == alone


@pytest.mark.parametrize("k", [2, 5, 17])
def test_top_k_never_returns_a_token_outside_the_k_best(k):
    logits = torch.randn(300, generator=torch.Generator().manual_seed(k))
    best = set(logits.topk(k).indices.tolist())
    tokens = draw(logits, SamplingParams(temperature=1.5, top_k=k), range(500))
    assert set(tokens) <= best
    assert len(set(tokens)) == k, "with 500 draws every one of the k best should appear"


@pytest.mark.parametrize("top_p, kept", [
    (0.35, {0}),              # 0.4 alone reaches 0.35
    (0.65, {0, 1}),           # 0.4 + 0.3 = 0.7 is the smallest prefix reaching 0.65
    (0.85, {0, 1, 2}),        # 0.9
    (0.95, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_p(top_p, kept):
    tokens = draw(LOGITS, SamplingParams(temperature=1.0, top_p=top_p), range(400))
    assert set(tokens) == kept


@pytest.mark.parametrize("top_k, top_p, kept", [
    (3, 1.0, {0, 1, 2}),
    (1, 0.65, {0}),
    (4, 0.65, {0, 1}),
])
def test_top_k_and_top_p_together(top_k, top_p, kept):
    tokens = draw(LOGITS, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p), range(400))
    assert set(tokens) == kept


@pytest.mark.parametrize("top_k, top_p, kept", [
    (2, 0.5, {0}),              # top-2 renormalized: 0.57, 0.43; token 0 alone reaches 0.5
    (3, 0.75, {0, 1}),          # top-3 renormalized: 0.44, 0.33, 0.22; tokens 0-1 reach 0.78
])
def test_top_p_applies_to_the_distribution_left_by_top_k(top_k, top_p, kept):
    tokens = draw(LOGITS, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p), range(400))
    assert set(tokens) == kept


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_frequencies_match_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    num_draws = 6000
    tokens = draw(logits, SamplingParams(temperature=temperature), range(num_draws))
    expected = torch.softmax(logits / temperature, dim=-1) * num_draws
    observed = torch.bincount(torch.tensor(tokens), minlength=len(logits)).float()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 4 degrees of freedom: P(chi2 > 25) is about 5e-5, and the seeds are fixed, so this never flakes;
    # a wrong temperature (or none) gives chi2 in the hundreds.
    assert chi2 < 25, f"chi-square {chi2:.1f}: observed {observed.tolist()}, expected {expected.tolist()}"


# ---- SamplingParams ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"max_tokens": 2.5}, "max_tokens must be an integer >= 1"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": math.nan}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
])
def test_sampling_params_reject_bad_values_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, is_greedy", [
    ({"temperature": 0}, True),
    ({"temperature": 0.7, "top_k": 1}, True),
    ({"temperature": 0.7}, False),
    ({"temperature": 1.0, "top_p": 0.5, "top_k": 3}, False),
])
def test_sampling_params_is_greedy(kwargs, is_greedy):
    assert SamplingParams(**kwargs).is_greedy is is_greedy


# ---- stopping --------------------------------------------------------------------------------
EOS = 2
# A fake tokenizer: tokens are word pieces, so a stop string can span tokens.
PIECES = ["a", "b", "<eos>", "c", "d", "Hel", "lo", " wor", "ld", "!"]


def detokenize(token_ids: list[int]) -> str:
    return "".join(PIECES[t] for t in token_ids if t != EOS)


def detokenize_bytes(token_ids: list[int]) -> str:
    """Byte-level BPE: a token may be part of one UTF-8 character (SmolLM2 splits '答案' into 5 tokens)."""
    return bytes(token_ids).decode("utf-8", errors="replace")


def sequence(prompt: list[int], output: list[int], **params) -> Sequence:
    return Sequence("r", prompt + output, len(prompt), SamplingParams(**params), seed=0, block_size=4)


STOP_CASES = {
    # name: (prompt, output, params, max_model_len, expected)
    "eos": ([0, 1], [3, EOS], {}, 100, (FinishReason.STOP, EOS)),
    "eos ignored": ([0, 1], [3, EOS], {"ignore_eos": True}, 100, None),
    "eos ignored until max_tokens": ([0, 1], [3, EOS], {"ignore_eos": True, "max_tokens": 2}, 100,
                                     (FinishReason.LENGTH, None)),
    "eos in the prompt only": ([EOS, 1], [3], {}, 100, None),
    "stop token id": ([0], [1, 4], {"stop_token_ids": (4, 9)}, 100, (FinishReason.STOP, 4)),
    "stop token id despite ignore_eos": ([0], [9], {"stop_token_ids": (9,), "ignore_eos": True}, 100,
                                         (FinishReason.STOP, 9)),
    "stop string within the newest token": ([0], [3, 4], {"stop": ("cd",)}, 100, (FinishReason.STOP, "cd")),
    "stop string spanning tokens": ([0], [5, 6, 7, 8], {"stop": ("lo world",)}, 100,
                                    (FinishReason.STOP, "lo world")),
    "first matching stop string wins": ([0], [3, 4], {"stop": ("zz", "d")}, 100, (FinishReason.STOP, "d")),
    "stop string only in the prompt": ([3, 4], [0], {"stop": ("cd",)}, 100, None),
    "stop string across prompt and output": ([3], [4], {"stop": ("cd",)}, 100, None),
    "stop string not there yet": ([0], [5, 6], {"stop": ("Hello!",)}, 100, None),
    "max_tokens": ([0, 1], [3, 4, 0], {"max_tokens": 3}, 100, (FinishReason.LENGTH, None)),
    "below max_tokens": ([0, 1], [3, 4], {"max_tokens": 3}, 100, None),
    "max_model_len": ([0, 1, 3], [4], {"max_tokens": 10}, 4, (FinishReason.LENGTH, None)),
    "eos beats max_tokens": ([0], [3, EOS], {"max_tokens": 2}, 100, (FinishReason.STOP, EOS)),
    "stop string beats max_tokens": ([0], [3, 4], {"max_tokens": 2, "stop": ("cd",)}, 100,
                                     (FinishReason.STOP, "cd")),
}


@pytest.mark.parametrize("prompt, output, params, max_model_len, expected", STOP_CASES.values(),
                         ids=STOP_CASES)
def test_check_stop(prompt, output, params, max_model_len, expected):
    seq = sequence(prompt, output, **params)
    assert check_stop(seq, (EOS,), max_model_len, detokenize) == expected


def test_check_stop_without_a_detokenizer_ignores_stop_strings():
    seq = sequence([0], [3, 4], stop=("cd",))
    assert check_stop(seq, (EOS,), 100, None) is None


@pytest.mark.parametrize("stop", ["éé", "答案"], ids=["two-byte-chars", "three-byte-chars"])
def test_check_stop_sees_a_multibyte_stop_string_split_over_byte_tokens(stop):
    seq = sequence([ord("x")], list(f"x{stop}".encode()), stop=(stop,))
    assert check_stop(seq, (EOS,), 100, detokenize_bytes) == (FinishReason.STOP, stop)


@pytest.mark.parametrize("text, stop, expected", [
    ("hello world", ("wor",), "hello "),
    ("hello world", ("o", "l"), "he"),          # the earliest stop string cuts, not the first listed
    ("hello world", ("zz",), "hello world"),
    ("hello world", (), "hello world"),
    ("hello world", ("hello",), ""),
    ("a.b.c", (".",), "a"),
])
def test_truncate_at_stop(text, stop, expected):
    assert truncate_at_stop(text, stop) == expected
