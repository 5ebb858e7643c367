"""Three consecutive draft steps match Gemma4AssistantForCausalLM (Gemma4UnifiedAssistantForCausalLM
for the 12B family) fed the same inputs."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import WINDOW, full_length_state, prompt_of
from hf_reference import hf_draft_step



# centroid head, dense head, the 12B family's assistant (centroid head), an assistant whose
# config gives other K/V head counts than the target's
@pytest.mark.parametrize("pair", ["e2b", "dense", "unified", "saved_config"])
@pytest.mark.parametrize("length", [WINDOW // 2, 3 * WINDOW + 3])
def test_three_draft_steps_match_transformers(pair, length, mlx_pairs, hf_assistants):
    target, _, drafter = mlx_pairs[pair]
    assistant = hf_assistants[pair]
    ids = prompt_of(length, seed=length)

    cache = target.make_cache(4)
    logits, hidden = target(mx.array([ids]), cache)
    shared_kv = target.drafter_kv(cache)
    reference_kv, _ = full_length_state(target, ids)
    token = mx.argmax(logits[0, -1], keepdims=True)
    ours_hidden = hidden[:, -1:]
    ref_hidden = np.array(ours_hidden).reshape(-1)
    position = length
    for _ in range(3):
        embedding = target.embed(token)[None]
        state, ours_hidden = drafter.step(embedding, ours_hidden, position, shared_kv)
        ours_logits = np.array(drafter.logits(state)).reshape(-1)
        ref_logits, ref_hidden = hf_draft_step(
            assistant, np.array(embedding).reshape(-1), ref_hidden, position, reference_kv
        )
        candidates = np.isfinite(ours_logits)
        assert (candidates == (ref_logits >= ref_logits[candidates].min())).all()
        span = ref_logits[candidates].max() - ref_logits[candidates].min()
        assert np.abs(ours_logits[candidates] - ref_logits[candidates]).max() <= 1e-3 * span
        ours_h = np.array(ours_hidden).reshape(-1)
        assert np.abs(ours_h - ref_hidden).max() <= 1e-3 * (np.abs(ref_hidden).max())
        token = drafter.greedy_token(state).reshape(1)
        assert token.item() == int(ref_logits.argmax())


def test_centroid_head_scores_only_top_centroid_blocks(mlx_pairs):
    _, _, drafter = mlx_pairs["e2b"]
    head = drafter.masked_embedding
    x = mx.random.normal((1, 1, drafter.args.text.hidden_size), key=mx.random.key(0))
    ids, _ = head.candidates(x, drafter.model.embed_tokens)
    top = np.argsort(-np.array(head.centroids(x)).reshape(-1))[: head.top_k]
    blocks = np.array(head.token_ordering).reshape(head.num_centroids, -1)[top]
    assert sorted(np.array(ids).reshape(-1).tolist()) == sorted(blocks.reshape(-1).tolist())
    assert np.isfinite(np.array(drafter.logits(x))).sum() == head.top_k * head.per_centroid
