"""`StepScheduler` over a real `KVCacheManager`, driven by a fake model (the scheduler is pure).

The fake model's next token is a function of the sequence's tokens so far, so a request that is
preempted and recomputed must still produce exactly the tokens of a run with room to spare.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.engine.kv_cache_manager import KVCacheManager
from services.engine.sampling import SamplingParams
from services.engine.sequence import FinishReason, Sequence, SequenceStatus
from services.engine.step_scheduler import SchedulerConfig, SchedulerOutput, StepScheduler

BLOCK_SIZE = 4


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64,
                   enable_prefix_caching: bool = True) -> StepScheduler:
    return StepScheduler(SchedulerConfig(max_num_seqs, budget),
                         KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching))


def make_seq(request_id: str, prompt_len: int, max_tokens: int = 8, first_token: int = 0) -> Sequence:
    prompt = list(range(first_token, first_token + prompt_len))
    return Sequence(request_id, prompt, prompt_len, SamplingParams(max_tokens=max_tokens, temperature=0),
                    seed=0, block_size=BLOCK_SIZE)


def fake_model_token(seq: Sequence) -> int:
    """Deterministic in the sequence's tokens, like a greedy model."""
    return (sum(seq.token_ids) * 31 + seq.num_tokens) % 1000


def run_step(scheduler: StepScheduler) -> SchedulerOutput:
    """One engine step: schedule, "run the model", postprocess, finish what reached max_tokens."""
    output = scheduler.schedule()
    scheduler.postprocess(output, [fake_model_token(c.seq) for c in output.chunks if c.samples])
    for chunk in output.chunks:
        if chunk.samples and chunk.seq.num_output_tokens >= chunk.seq.params.max_tokens:
            scheduler.finish(chunk.seq, FinishReason.LENGTH)
    return output


def assert_step_is_valid(scheduler: StepScheduler, output: SchedulerOutput, seqs: list[Sequence]) -> None:
    config = scheduler.config
    assert output.num_tokens <= config.max_num_batched_tokens, "token budget exceeded"
    kinds = [c.is_decode for c in output.chunks]
    assert kinds == sorted(kinds, reverse=True), "decodes must come before prefill chunks"
    assert len({id(c.seq) for c in output.chunks}) == len(output.chunks), "a request scheduled twice"
    assert len(scheduler.running) <= config.max_num_seqs
    for seq in seqs:      # nothing is dropped: each request is running, waiting or finished, exactly once
        places = [seq in scheduler.running, seq in scheduler.waiting, seq.is_finished]
        assert places.count(True) == 1, f"{seq.request_id} is in {places} (running, waiting, finished)"


def run_to_completion(scheduler: StepScheduler, seqs: list[Sequence],
                      max_steps: int = 1000) -> list[SchedulerOutput]:
    outputs = []
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_unfinished:
        assert len(outputs) < max_steps, "the scheduler stopped making progress"
        output = run_step(scheduler)
        assert not output.is_empty, "a step with unfinished requests scheduled nothing"
        assert_step_is_valid(scheduler, output, seqs)
        outputs.append(output)
    return outputs


@dataclass(frozen=True)
class Workload:
    prompt_lens: tuple[int, ...]
    max_tokens: int
    num_blocks: int
    max_num_seqs: int
    budget: int
    preempts: bool            # guards the table: tight rows must really exercise preemption

    def seqs(self) -> list[Sequence]:
        return [make_seq(f"r{i}", n, self.max_tokens, first_token=100 * i)
                for i, n in enumerate(self.prompt_lens)]


WORKLOADS = {
    "roomy": Workload((5, 9, 3), 6, 64, 8, 64, preempts=False),
    "chunked prefill": Workload((30, 17, 4), 5, 64, 8, 8, preempts=False),
    "max_num_seqs 1": Workload((5, 6, 7), 4, 64, 1, 64, preempts=False),
    "tight blocks": Workload((8, 8, 8), 10, 8, 4, 32, preempts=True),
    "tight blocks and budget": Workload((13, 11, 9, 7), 12, 10, 3, 5, preempts=True),
    "tight blocks, budget 2": Workload((4, 4, 4), 9, 6, 3, 3, preempts=True),
}


@pytest.mark.parametrize("workload", WORKLOADS.values(), ids=WORKLOADS)
def test_every_request_finishes_with_the_tokens_of_an_unconstrained_run(workload):
    roomy = make_scheduler(num_blocks=256, max_num_seqs=64, budget=1024)
    expected = workload.seqs()
    run_to_completion(roomy, expected)

    scheduler = make_scheduler(workload.num_blocks, workload.max_num_seqs, workload.budget)
    seqs = workload.seqs()
    outputs = run_to_completion(scheduler, seqs)

    assert [s.output_token_ids for s in seqs] == [s.output_token_ids for s in expected]
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert any(o.preempted for o in outputs) is workload.preempts
    assert sum(s.num_preemptions for s in seqs) == sum(len(o.preempted) for o in outputs)
    assert scheduler.kv.num_free_blocks == workload.num_blocks, "blocks leaked after every request finished"


# ---- one step at a time -------------------------------------------------------------------------
@pytest.mark.parametrize("num_decoding, budget, new_prompt_len, expected_chunk_sizes", [
    (3, 10, 20, [1, 1, 1, 7]),        # decodes first, the prompt gets what is left
    (3, 3, 20, [1, 1, 1]),            # no budget left for the prompt
    (2, 64, 20, [1, 1, 20]),
    (0, 10, 20, [10]),
])
def test_decodes_come_first_and_the_token_budget_is_respected(num_decoding, budget, new_prompt_len,
                                                              expected_chunk_sizes):
    scheduler = make_scheduler(budget=64)
    decoding = [make_seq(f"d{i}", 3, first_token=10 * i) for i in range(num_decoding)]
    for seq in decoding:
        scheduler.add(seq)
    run_step(scheduler)                                 # prefill them: next step each decodes one token
    scheduler.config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)   # from now on
    scheduler.add(make_seq("new", new_prompt_len, first_token=500))

    output = scheduler.schedule()

    assert [c.num_tokens for c in output.chunks] == expected_chunk_sizes
    assert [c.seq for c in output.chunks[:num_decoding]] == decoding
    assert all(c.is_decode for c in output.chunks[:num_decoding])


def test_an_imported_decode_is_ordered_before_an_imported_prefill():
    """Requests imported mid-prefill join `running` in arrival order; the model runner still needs
    every decode ahead of every prefill chunk."""
    scheduler = make_scheduler()
    prefilling, decoding = make_seq("prefilling", 11), make_seq("decoding", 9, first_token=50)
    for seq in (prefilling, decoding):              # what import_kv does: blocks, then add_running
        scheduler.kv.allocate(seq, 8)
        seq.num_computed_tokens = 8
        scheduler.add_running(seq)

    output = scheduler.schedule()

    assert [(c.seq, c.num_tokens, c.is_decode) for c in output.chunks] == [(decoding, 1, True),
                                                                          (prefilling, 3, False)]


@pytest.mark.parametrize("prompt_len, budget, expected_chunks", [
    (20, 8, [(0, 8, False), (8, 8, False), (16, 4, True)]),
    (16, 8, [(0, 8, False), (8, 8, True)]),
    (9, 8, [(0, 8, False), (8, 1, True)]),
    (8, 8, [(0, 8, True)]),
    (3, 8, [(0, 3, True)]),
])
def test_chunked_prefill_splits_a_long_prompt_and_only_the_last_chunk_samples(prompt_len, budget,
                                                                              expected_chunks):
    scheduler = make_scheduler(budget=budget)
    seq = make_seq("long", prompt_len)
    scheduler.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        (chunk,) = run_step(scheduler).chunks
        chunks.append((chunk.start, chunk.num_tokens, chunk.samples))
    assert chunks == expected_chunks
    assert seq.num_computed_tokens == prompt_len and seq.num_tokens == prompt_len + 1


def test_max_num_seqs_caps_the_running_requests_and_the_rest_wait_in_order():
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(f"r{i}", 3, max_tokens=2, first_token=10 * i) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler)
    assert scheduler.running == seqs[:2]
    assert list(scheduler.waiting) == seqs[2:]
    run_step(scheduler)                      # r0 and r1 reach max_tokens; r2 and r3 get their places
    run_step(scheduler)
    assert scheduler.running == seqs[2:4]


def test_running_out_of_blocks_preempts_the_latest_admitted_request_by_recompute():
    # 6 blocks of 4 tokens. A and B take 2 blocks each for their 8-token prompts, then a third
    # block each while decoding; when A needs a fourth, B (admitted last) is preempted.
    scheduler = make_scheduler(num_blocks=6, budget=32)
    a, b = make_seq("A", 8, max_tokens=10), make_seq("B", 8, max_tokens=10, first_token=50)
    late = make_seq("C", 8, max_tokens=2, first_token=90)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    scheduler.add(late)                      # waits: no blocks for it while A and B decode
    output = run_step(scheduler)
    while not output.preempted:
        assert late in scheduler.waiting
        output = run_step(scheduler)

    assert output.preempted == (b,)
    assert [c.seq for c in output.chunks] == [a]
    assert b.status is SequenceStatus.WAITING
    assert (b.block_ids, b.num_computed_tokens, b.num_preemptions) == ([], 0, 1)
    assert b.num_tokens == 8 + b.num_output_tokens and b.num_output_tokens == 5, "B keeps every token"
    assert list(scheduler.waiting) == [b, late], "the preempted request goes to the front of the queue"

    while scheduler.has_unfinished:
        run_step(scheduler)
    assert all(s.finish_reason is FinishReason.LENGTH for s in (a, b, late))
    reference = make_seq("B", 8, max_tokens=10, first_token=50)
    run_to_completion(make_scheduler(), [reference])
    assert b.output_token_ids == reference.output_token_ids
    assert scheduler.kv.num_free_blocks == 6


@pytest.mark.parametrize("where", ["running", "waiting", "preempted"])
def test_finish_is_idempotent_and_frees_blocks(where):
    # 3 blocks of 4 tokens: two 4-token prompts fit, but both cannot decode into a second block.
    scheduler = make_scheduler(num_blocks=3)
    other, seq = make_seq("other", 4, first_token=50), make_seq("r", 4)
    if where == "preempted":
        scheduler.add(other)
    scheduler.add(seq)
    if where != "waiting":
        run_step(scheduler)
        assert seq.block_ids
    if where == "preempted":
        assert run_step(scheduler).preempted == (seq,)

    scheduler.finish(seq, FinishReason.ABORT)
    scheduler.finish(seq, FinishReason.STOP, stop_reason=2)

    assert seq.status is SequenceStatus.FINISHED
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.ABORT, None), "the first finish decides"
    assert seq.block_ids == [] and scheduler.kv.num_free_blocks == 3 - len(other.block_ids)
    assert seq not in scheduler.running and seq not in scheduler.waiting


@pytest.mark.parametrize("prompt_len, expected_start", [
    (10, 8),      # two full blocks hit
    (8, 4),       # the second block holds the last token, which must be recomputed
    (12, 8),
    (5, 4),
    (4, 0),
    (1, 0),
])
def test_a_second_identical_prompt_starts_after_its_prefix_cache_hits(prompt_len, expected_start):
    scheduler = make_scheduler()
    run_step_with(scheduler, make_seq("first", prompt_len))
    second = make_seq("second", prompt_len)
    (chunk,) = run_step_with(scheduler, second).chunks
    assert (chunk.start, chunk.num_tokens) == (expected_start, prompt_len - expected_start)
    assert chunk.samples
    assert scheduler.kv.num_hit_blocks == expected_start // BLOCK_SIZE


def test_without_prefix_caching_a_second_identical_prompt_starts_at_zero():
    scheduler = make_scheduler(enable_prefix_caching=False)
    run_step_with(scheduler, make_seq("first", 10))
    (chunk,) = run_step_with(scheduler, make_seq("second", 10)).chunks
    assert chunk.start == 0


def run_step_with(scheduler: StepScheduler, seq: Sequence) -> SchedulerOutput:
    """Add `seq`, run one step, and keep only its chunk (other requests are finished first)."""
    for other in list(scheduler.running):
        scheduler.finish(other, FinishReason.ABORT)
    scheduler.add(seq)
    return run_step(scheduler)


@pytest.mark.parametrize("budget, prompt_len, num_output", [
    (6, 12, 1),          # prefill chunks of 6: block 1 fills in the second chunk
    (64, 6, 4),          # block 1 fills while decoding
])
def test_blocks_filled_after_their_first_step_become_prefix_cache_hits(budget, prompt_len, num_output):
    scheduler = make_scheduler(budget=budget)
    first = make_seq("first", prompt_len, max_tokens=num_output)
    run_to_completion(scheduler, [first])
    computed = first.token_ids[:-1]          # the last sampled token never had its KV computed
    second = Sequence("second", computed + [999], len(computed) + 1, first.params, 0, BLOCK_SIZE)
    (chunk,) = run_step_with(scheduler, second).chunks
    assert chunk.start == len(computed) // BLOCK_SIZE * BLOCK_SIZE
