"""Batched speculative decoding: every row is exactly its prompt's single-stream output.

Greedy rows equal single-stream greedy decoding (ours; the rest of the suite ties ours to
transformers) token for token, over ragged prompts, ragged limits, k in {1, 3, 6}, rows
joining mid-generation and leaving early. Sampled rows keep the target's distribution (a
chi-square test against the exact joint distribution of the first three tokens, as in
test_sampling.py) and a seeded row is the same whatever shares its batch. Sliding caches
stay bounded; removed rows free their memory.
"""

import numpy as np
import pytest

import mlx.core as mx

from conftest import PAIRS, Pair
from test_adaptive_exactness import Cycle
from test_sampling import chi_square_p_value
from gemma_mtp_mlx import load, stream_generate
from gemma_mtp_mlx.batch import BatchEngine, batch_generate
from gemma_mtp_mlx.batch.cache import RESERVE, RaggedKVCache
from gemma_mtp_mlx.sampling import Sampling

WINDOW = 16  # the fixtures' sliding window
LIMITS = [3 * WINDOW + 12, 20, 3 * WINDOW + 4, 1]  # ragged, past 3x the window


def ragged_prompts(seed=0, lengths=(1, 2 * WINDOW + 5, 9, 40)):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=n).tolist() for n in lengths]


def single_stream(pair, prompt, max_tokens, **options):
    return [r.token for r in stream_generate(pair.target, pair.tokenizer, prompt, max_tokens=max_tokens, **options)]


def run_engine(engine, schedule):
    """Step `engine` until idle; `schedule` maps a step number to callables run before it."""
    tokens, finish, step = {}, {}, 0
    while engine.has_work or any(s >= step for s in schedule):
        for action in schedule.get(step, []):
            action(tokens)
        for event in engine.step():
            tokens.setdefault(event.uid, []).extend(event.tokens)
            if event.finish_reason:
                finish[event.uid] = event.finish_reason
        step += 1
    return tokens, finish


@pytest.mark.parametrize("pair", list(PAIRS))
def test_greedy_rows_equal_single_stream_past_3x_window(pair, mlx_pairs):
    p = mlx_pairs[pair]
    prompts = ragged_prompts()
    reference = [single_stream(p, prompt, n) for prompt, n in zip(prompts, LIMITS)]
    plain = batch_generate(p.target, p.tokenizer, prompts, max_tokens=LIMITS, return_token_ids=True)
    assert plain.token_ids == reference
    for k in (1, 3, 6, "auto"):
        out = batch_generate(p.target, p.tokenizer, prompts, draft_model=p.drafter, num_draft_tokens=k,
                             max_tokens=LIMITS, return_token_ids=True)
        assert out.token_ids == reference, f"k={k}"
        assert [len(t) for t in out.token_ids] == LIMITS and out.finish_reasons == ["length"] * 4


@pytest.fixture(scope="module")
def default_pair():
    return Pair(*load())


def test_ragged_acceptance_with_rows_joining_and_leaving(default_pair):
    """The trained default pair accepts 1-6 drafts a round, differently per row: each row
    keeps exactly its own verified K/V. Rows with their own k join mid-generation (one
    with a prompt prefilled in several chunks), one leaves early; the others are unaffected."""
    target, tokenizer, drafter = default_pair
    text = "def parse(self, text):\n    for line in text.splitlines():\n        if not line:"
    ids = tokenizer.encode(text)
    prompts = [ids, ids[:5], ids[3:], ids[:12] * 3]
    limits = [110, 60, 70, 50]
    ks = [3, 6, 1, 4]
    engine = BatchEngine(target, tokenizer, drafter, num_draft_tokens=4, prefill_step_size=16)
    uids = {}

    def insert(i):
        return lambda _: uids.setdefault(i, engine.insert(prompts[i], max_tokens=limits[i], num_draft_tokens=ks[i]))

    def remove_row_1(tokens):
        engine.remove(uids[1])

    schedule = {0: [insert(0), insert(1)], 3: [insert(2)], 6: [insert(3)], 9: [remove_row_1]}
    stats = {}
    engine_step = engine.step

    def step():
        events = engine_step()
        stats.update({e.uid: e.stats for e in events if e.stats})
        return events

    engine.step = step
    tokens, finish = run_engine(engine, schedule)
    for i in (0, 1, 2, 3):
        # single-stream speculative output (the suite ties it to the target alone)
        alone = list(stream_generate(target, tokenizer, prompts[i], draft_model=drafter, num_draft_tokens=ks[i],
                                     max_tokens=limits[i]))
        reference = [r.token for r in alone]
        if i == 1:  # removed early
            assert uids[1] not in finish and 5 < len(tokens[uids[1]]) < limits[1]
            assert tokens[uids[1]] == reference[: len(tokens[uids[1]])]
            continue
        assert tokens[uids[i]] == reference, f"row {i}"
        assert finish[uids[i]] == "length"
        # The drafter saw each row's own context (position, window, K/V): the same drafts
        # were accepted as in single-stream speculative decoding.
        assert stats[uids[i]].accepted_by_position == alone[-1].stats.accepted_by_position, f"row {i}"
        assert stats[uids[i]].mean_accepted_length > 1.5
    assert not engine.has_work and engine.num_active == 0


def test_auto_rows_choose_their_k_each_round_and_stay_exact(default_pair):
    """num_draft_tokens="auto" rows (the engine's controller picks one k a round for all
    of them) beside a fixed-k row: every row equals plain single-stream decoding, and the
    auto rows' statistics show the rounds they ran at each k."""
    target, tokenizer, drafter = default_pair
    ids = tokenizer.encode("class Stack:\n    def __init__(self):\n        self.items = []\n")
    prompts = [ids, ids[:9], ids[4:]]
    engine = BatchEngine(target, tokenizer, drafter, num_draft_tokens="auto")
    engine.controller = Cycle()  # every switch (0 <-> 8, 1, 3, ...) within a few rounds, whatever the timings
    uids = [engine.insert(prompts[0], max_tokens=90), engine.insert(prompts[1], max_tokens=70),
            engine.insert(prompts[2], max_tokens=80, num_draft_tokens=3)]
    tokens, stats = {}, {}
    while engine.has_work:
        for e in engine.step():
            tokens.setdefault(e.uid, []).extend(e.tokens)
            if e.stats:
                stats[e.uid] = e.stats
    for uid, prompt, n in zip(uids, prompts, (90, 70, 80)):
        assert tokens[uid] == [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=n)]
    for uid in uids[:2]:
        s = stats[uid]
        assert s.auto and s.num_draft_tokens == 8 and sum(s.rounds_by_k) == s.rounds
        assert len(s.drafted_by_position) == 8 and sum(s.drafted_by_position) == s.drafted_tokens
        assert all(s.rounds_by_k[k] for k in set(Cycle.WIDTHS)), s.rounds_by_k
    assert not stats[uids[2]].auto and stats[uids[2]].num_draft_tokens == 3


def test_rows_joining_and_leaving_on_a_fixture_pair(mlx_pairs):
    p = mlx_pairs["e2b"]
    prompts = ragged_prompts(seed=1)
    limits = [3 * WINDOW + 10, 40, 3 * WINDOW, 25]
    engine = BatchEngine(p.target, p.tokenizer, p.drafter, num_draft_tokens=3, max_batch_size=3,
                         prefill_step_size=7)
    uids = [engine.insert(prompts[i], max_tokens=limits[i], num_draft_tokens=1 + i) for i in range(2)]
    schedule = {4: [lambda _: uids.append(engine.insert(prompts[2], max_tokens=limits[2], num_draft_tokens=6)),
                    lambda _: uids.append(engine.insert(prompts[3], max_tokens=limits[3]))],
                12: [lambda _: engine.remove(uids[1])]}
    tokens, finish = run_engine(engine, schedule)
    for i in (0, 2, 3):
        assert tokens[uids[i]] == single_stream(p, prompts[i], limits[i]), f"row {i}"
    assert tokens[uids[1]] == single_stream(p, prompts[1], limits[1])[: len(tokens[uids[1]])]
    assert len(tokens[uids[1]]) < limits[1]


def test_eos_finishes_a_row(mlx_pairs):
    p = mlx_pairs["dense"]
    prompt = ragged_prompts()[1]
    full = single_stream(p, prompt, 30)
    eos = full[10]
    saved = set(p.tokenizer.eos_token_ids)
    p.tokenizer.eos_token_ids = saved | {eos}
    try:
        out = batch_generate(p.target, p.tokenizer, [prompt, prompt[:3]], draft_model=p.drafter, max_tokens=30,
                             return_token_ids=True)
    finally:
        p.tokenizer.eos_token_ids = saved
    assert out.token_ids[0] == full[: full.index(eos) + 1]
    assert out.finish_reasons[0] == "stop"


# --- sampling ---------------------------------------------------------------------------

SAMPLES = 600  # per row
ROWS = [  # (prompt, options): four rows of different prompts and temperatures
    ([2, 40, 41, 42], dict(temp=1.0)),
    ([2, 7], dict(temp=0.7)),
    ([2, 90, 91, 92, 93, 94, 95], dict(temp=1.0, top_p=0.9, top_k=20)),
    ([2, 11, 12], dict(temp=0.8, min_p=0.05)),
]


def exact_joint(target, prompt, sampling, min_prob):
    """{(x1, x2, x3): p} under the target for every outcome with p >= min_prob."""

    def next_probs(prefixes):
        logits, _ = target(mx.array([prompt + list(q) for q in prefixes]), None)
        return np.exp(np.array(sampling.process(None, None, logits[:, -1])))

    layer = {(): 1.0}
    for _ in range(3):
        prefixes = list(layer)
        probs = next_probs(prefixes)
        layer = {q + (int(t),): layer[q] * probs[i, t] for i, q in enumerate(prefixes)
                 for t in np.flatnonzero(layer[q] * probs[i] >= min_prob)}
    return layer


def test_each_sampled_row_keeps_the_target_distribution(mlx_pairs):
    p = mlx_pairs["e2b"]
    engine = BatchEngine(p.target, p.tokenizer, p.drafter, num_draft_tokens=2, max_batch_size=SAMPLES * len(ROWS))
    mx.random.seed(0)
    rows = {}
    for n in range(SAMPLES):
        for r, (prompt, options) in enumerate(ROWS):
            rows[engine.insert(prompt, max_tokens=3, num_draft_tokens=1 + r % 2, **options)] = r
    tokens, _ = run_engine(engine, {})
    for r, (prompt, options) in enumerate(ROWS):
        samples = np.array([tokens[uid] for uid, row in rows.items() if row == r])
        joint = exact_joint(p.target, prompt, Sampling(**options), 5 / SAMPLES)
        assert chi_square_p_value(samples, joint) > 1e-3, f"row {r}"


def test_a_seeded_row_is_the_same_whatever_shares_its_batch(mlx_pairs):
    p = mlx_pairs["e2b"]
    prompt, options = ROWS[0]

    def seeded_row(others, seed=5):
        engine = BatchEngine(p.target, p.tokenizer, p.drafter, num_draft_tokens=3)
        for other_prompt, other_options in others[:2]:
            engine.insert(other_prompt, max_tokens=40, **other_options)
        uid = engine.insert(prompt, max_tokens=40, seed=seed, **options)
        schedule = {3: [lambda _: engine.insert(q, max_tokens=20, num_draft_tokens=5, **o) for q, o in others[2:]]}
        return run_engine(engine, schedule)[0][uid]

    alone = seeded_row([])
    assert seeded_row(ROWS[1:]) == alone
    assert seeded_row(ROWS[::-1]) == alone
    assert seeded_row([], seed=6) != alone


# --- memory ------------------------------------------------------------------------------

def test_sliding_caches_stay_bounded_and_removed_rows_free_memory(mlx_pairs):
    p = mlx_pairs["e2b"]
    k = 4
    engine = BatchEngine(p.target, p.tokenizer, p.drafter, num_draft_tokens=k, prefill_step_size=64)
    prompts = ragged_prompts(seed=2, lengths=(5 * WINDOW, 3, 2 * WINDOW))
    uids = [engine.insert(q, max_tokens=12 * WINDOW) for q in prompts]
    while engine.num_active < 3 or min(r.position for r in engine.active) < 10 * WINDOW:
        engine.step()
    sliding = [c for c in engine.cache if c.window is not None]
    assert sliding and all(isinstance(c, RaggedKVCache) for c in engine.cache)
    for c in sliding:
        assert c.rows == 3 and min(c.lengths) >= 10 * WINDOW
        assert c.capacity <= WINDOW + 1 + RESERVE + max(k + 1, c.step)  # window + draft slack, per row
    before = sum(c.nbytes for c in engine.cache)
    engine.remove(uids[0])
    after_one = sum(c.nbytes for c in engine.cache)
    assert after_one <= before * 2 / 3 + 1
    for uid in uids[1:]:
        engine.remove(uid)
    assert sum(c.nbytes for c in engine.cache) == 0 and not engine.has_work


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prompts, options, message",
    [
        ([], {}, "prompts must be a non-empty list"),
        ([[5, 6], []], {}, "prompt 1: the prompt is empty"),
        ([[5, 6], ""], {}, "prompt 1: the prompt is empty"),
        ([[5, 6], [7]], dict(max_tokens=[10]), "max_tokens has 1 values for 2 prompts"),
        ([[5, 6]], dict(max_tokens=0), "max_tokens must be at least 1"),
        ([[5, 6]], dict(temp=-1.0), "temp must be >= 0"),
        ([[5, 999]], {}, r"prompt token ids must be integers in \[0, 256\)"),
    ],
)
def test_bad_input_is_a_clear_error(prompts, options, message, mlx_pairs):
    p = mlx_pairs["e2b"]
    with pytest.raises(ValueError, match=message):
        batch_generate(p.target, p.tokenizer, prompts, draft_model=p.drafter, **options)


def test_engine_refuses_text_and_a_draft_length_without_drafter(mlx_pairs):
    p = mlx_pairs["e2b"]
    with pytest.raises(ValueError, match="insert takes token ids"):
        BatchEngine(p.target, p.tokenizer, p.drafter).insert("hello", max_tokens=3)
    with pytest.raises(ValueError, match="num_draft_tokens needs a draft model"):
        BatchEngine(p.target, p.tokenizer).insert([5], max_tokens=3, num_draft_tokens=2)


def test_logits_processors_logprobs_and_top_logprobs_per_row(default_pair):
    """A row with a repetition penalty beside rows without: each equals its single-stream
    run (tokens and the target's log-probabilities; the trained pair accepts drafts, so the
    penalty's history must include them); top_logprobs rank the emitted token."""
    from mlx_lm.sample_utils import make_logits_processors

    p = default_pair
    processors = make_logits_processors(repetition_penalty=1.3, repetition_context_size=10)
    prompt = p.tokenizer.encode("def parse(self, text):\n    for line in text.splitlines():\n")
    engine = BatchEngine(p.target, p.tokenizer, p.drafter, num_draft_tokens=3)
    penalized = engine.insert(prompt, max_tokens=50, logits_processors=processors)
    ranked = engine.insert(prompt[:7], max_tokens=30, top_logprobs=3)
    sampled = engine.insert(prompt, max_tokens=30, temp=1.0, logits_processors=processors, seed=3)
    events = {}
    while engine.has_work:
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    for uid, (q, n, options) in {penalized: (prompt, 50, dict(logits_processors=processors)),
                                 ranked: (prompt[:7], 30, {})}.items():
        alone = list(stream_generate(p.target, p.tokenizer, q, draft_model=p.drafter, num_draft_tokens=3,
                                     max_tokens=n, **options))
        assert [t for e in events[uid] for t in e.tokens] == [r.token for r in alone]
        logprobs = [lp for e in events[uid] for lp in e.logprobs]
        assert np.allclose(logprobs, [r.logprob for r in alone], atol=1e-4)
    unpenalized = single_stream(p, prompt, 50)
    assert [t for e in events[penalized] for t in e.tokens] != unpenalized
    for e in events[ranked]:
        assert len(e.top_logprobs) == len(e.tokens)
        for token, logprob, top in zip(e.tokens, e.logprobs, e.top_logprobs):
            assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - logprob) < 1e-6
    assert len([t for e in events[sampled] for t in e.tokens]) == 30


@pytest.mark.parametrize("pair", ["e2b", "dense"])
def test_rows_start_from_the_prompt_cache_and_leave_their_cache_there(pair, mlx_pairs):
    """The server's prompt cache through the engine: a row that ends leaves its K/V there
    (converted to the single-stream cache), the next turn's row starts from it and prefills
    only its new tokens, past the window, beside a row already running; a row sharing only
    part of an entry starts from a rolled-back copy when the sliding layers allow. Every
    row's output is its single-stream output; a penalised row uses the cache too."""
    from gemma_mtp_mlx.server.prompt_cache import PromptCache
    from mlx_lm.sample_utils import make_logits_processors

    p = mlx_pairs[pair]
    cache = PromptCache(8, 1 << 30)
    engine = BatchEngine(p.target, p.tokenizer, p.drafter, num_draft_tokens=3, max_batch_size=4,
                         prompt_cache=cache, prefill_step_size=9)
    first, other = ragged_prompts(seed=2, lengths=(2 * WINDOW + 5, 11))
    cached = {}

    def run(prompts, limits, processors=None):
        uids = [engine.insert(q, max_tokens=n, logits_processors=processors) for q, n in zip(prompts, limits)]
        tokens = {}
        while engine.has_work:
            for event in engine.step():
                tokens.setdefault(event.uid, []).extend(event.tokens)
                if event.cached_tokens is not None:
                    cached[event.uid] = event.cached_tokens
        return [tokens[u] for u in uids], [cached[u] for u in uids]

    (out,), (hit,) = run([first], [2 * WINDOW])
    assert hit == 0 and sorted(map(len, cache.entries)) == [len(first), len(first) + len(out) - 1]  # prompt, all
    turn = first + out + [7, 8, 9]  # the next turn, beside a new row
    (got, got_other), hits = run([turn, other], [3 * WINDOW, 20])
    assert got == single_stream(p, turn, 3 * WINDOW) and got_other == single_stream(p, other, 20)
    assert hits == [len(first) + len(out) - 1, 0]
    shared = turn + got[:-3] + [5]  # shares all but the last 3 tokens of the newest entry
    (got,), (hit,) = run([shared], [WINDOW])
    assert got == single_stream(p, shared, WINDOW)
    assert hit in (0, len(shared) - 1)  # a rolled-back copy, or none when the window has moved on
    again = shared + got + [11, 12]
    (got,), (hit,) = run([again], [WINDOW], make_logits_processors(repetition_penalty=1.3))
    assert hit == len(shared) + WINDOW - 1
    assert got == single_stream(p, again, WINDOW, logits_processors=make_logits_processors(repetition_penalty=1.3))


def test_no_round_is_queued_behind_one_that_ends_every_row(default_pair, monkeypatch):
    """Rounds are queued one ahead, but not behind a round that may end every row (it would
    be computed and dropped): the engine queues exactly as many rounds as its longest row
    ran, and every row is what single-stream decoding gives it."""
    target, tokenizer, drafter = default_pair
    ids = tokenizer.encode("def area(self):\n    return self.width * self.height\n")
    prompts, limits = [ids, ids[:7]], [41, 23]
    queued = []
    queue = BatchEngine._queue

    def counting(engine):
        queued.append(len(engine.active))
        return queue(engine)

    monkeypatch.setattr(BatchEngine, "_queue", counting)
    out = batch_generate(target, tokenizer, prompts, draft_model=drafter, num_draft_tokens=4, max_tokens=limits,
                         return_token_ids=True)
    assert out.finish_reasons == ["length", "length"]
    assert len(queued) == max(s.rounds for s in out.stats)
    for prompt, n, tokens in zip(prompts, limits, out.token_ids):
        assert tokens == [r.token for r in stream_generate(target, tokenizer, prompt, draft_model=drafter,
                                                           num_draft_tokens=4, max_tokens=n)]
