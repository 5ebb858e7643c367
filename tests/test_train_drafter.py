"""`gemma-mtp train-drafter`: the MLX training forward and loss against transformers, and the
training run (determinism, exact resume, output layout, bad input)."""

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten

from conftest import full_length_state
from gemma_mtp_mlx import cli, load, load_drafter
from gemma_mtp_mlx.train import trainer as td
from gemma_mtp_mlx.checkpoint import CheckpointError
from gemma_mtp_mlx.train.data import DataError, read_documents
from hf_reference import hf_draft_step, load_hf_assistant

WINDOW = 16  # the fixtures' sliding window
LENGTH = 3 * WINDOW + 5
DRAFT_STEPS = 3


def random_ids(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 256, size=(rows, LENGTH))


# ---------------------------------------------------------------------------
# The training forward and loss


@pytest.mark.parametrize("pair", ["e2b", "dense"])  # centroid head, dense head
def test_parallel_forward_equals_transformers_at_single_positions(pair, mlx_pairs, hf_assistants):
    """Every position of one parallel forward, unrolled 3 steps, equals transformers'
    assistant run one position at a time, below and past the sliding window."""
    target, _, drafter = mlx_pairs[pair]
    assistant = hf_assistants[pair]
    ids = random_ids(1)[0].tolist()
    states = td.unrolled_states(drafter, td.teacher(target, mx.array([ids])), DRAFT_STEPS)
    hidden_states = td.teacher(target, mx.array([ids])).hidden
    for position in (5, WINDOW + 1, 2 * WINDOW + 7, LENGTH - DRAFT_STEPS):
        reference_kv, _ = full_length_state(target, ids[:position])  # K/V of positions < P
        ref_hidden = np.array(hidden_states[0, position - 1])
        for j in range(DRAFT_STEPS):
            embedding = np.array(target.embed(mx.array([ids[position + j]])))[0]
            ref_logits, ref_hidden = hf_draft_step(assistant, embedding, ref_hidden, position, reference_kv)
            state = states[j][0, position - 1]
            ours = np.array(drafter.logits(state))
            candidates = np.isfinite(ours)
            assert np.abs(ours[candidates] - ref_logits[candidates]).max() < 1e-4
            dense = np.array(td.dense_logits(drafter, state))
            assert np.abs(dense[candidates] - ours[candidates]).max() < 1e-5
            projected = np.array(drafter.post_projection(state))
            assert np.abs(projected - ref_hidden).max() < 1e-4


def drafter_masks_torch(length: int, window: int) -> dict:
    positions = torch.arange(1, length)[:, None]
    keys = torch.arange(length)[None, :]
    full = keys < positions
    sliding = full & (keys >= positions - window - 1)
    return {"full_attention": full[None, None], "sliding_attention": sliding[None, None]}


@torch.no_grad()
def torch_reference_loss(hf_target, assistant, batch: torch.Tensor, steps: int) -> float:
    """The loss as scripts/train_default_pair.py computed it in PyTorch (checked there against
    transformers' single-position assistant to 1.2e-5): soft cross-entropy to the target's
    next-token distribution + cross-entropy to its per-centroid mass, unrolled `steps` at P."""
    config = hf_target.config
    out = hf_target(input_ids=batch, output_hidden_states=True, return_shared_kv_states=True)
    hidden = out.hidden_states[-1]
    p = F.softmax(out.logits, dim=-1)
    head = assistant.masked_embedding
    per = config.vocab_size // assistant.config.num_centroids
    cluster_of = torch.empty(config.vocab_size, dtype=torch.long)
    cluster_of[head.token_ordering.long()] = torch.arange(config.vocab_size) // per
    cluster_p = torch.zeros(*p.shape[:-1], assistant.config.num_centroids).index_add_(-1, cluster_of, p)
    embeds = hf_target.model.embed_tokens.weight[batch] * config.hidden_size**0.5
    seq_len = batch.shape[1] - 1
    masks = drafter_masks_torch(seq_len + 1, config.sliding_window)
    positions = torch.arange(1, seq_len + 1)[None]
    total, state = 0.0, hidden[:, :-1]
    for j in range(steps):
        length = seq_len - j
        x = assistant.pre_projection(torch.cat([embeds[:, 1 + j :], state[:, :length]], dim=-1))
        h = assistant.model(
            inputs_embeds=x, attention_mask={k: m[..., :length, :] for k, m in masks.items()},
            position_ids=positions[:, :length], shared_kv_states=dict(out.shared_kv_states), use_cache=False,
            output_hidden_states=True,  # sidesteps transformers 5.23 slicing absent per-layer inputs
        ).last_hidden_state
        total += F.cross_entropy(assistant.lm_head(h).flatten(0, 1), p[:, 1 + j :].flatten(0, 1))
        total += F.cross_entropy(head.centroids(h).flatten(0, 1), cluster_p[:, 1 + j :].flatten(0, 1))
        state = assistant.post_projection(h)
    return float(total / steps)


def test_loss_equals_the_pytorch_reference(mlx_pairs, hf_targets, hf_assistants):
    target, _, drafter = mlx_pairs["e2b"]
    ids = random_ids(2, seed=1)
    ours = td.drafter_loss(drafter, td.teacher(target, mx.array(ids)), DRAFT_STEPS).item()
    reference = torch_reference_loss(hf_targets["e2b_target"], hf_assistants["e2b"], torch.from_numpy(ids), DRAFT_STEPS)
    assert abs(ours - reference) < 1e-4 * abs(reference)


# ---------------------------------------------------------------------------
# Training runs (tiny: 4 steps of 2 x 32 tokens)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(Path(td.__file__).read_text())  # ~20k characters of Python
    return path


@pytest.fixture(scope="module")
def settings(pairs, corpus_file) -> td.Settings:
    target, assistant = pairs["e2b"]
    return td.Settings(
        model=str(target), draft_model=str(assistant), data=[str(corpus_file)], out="",
        steps=4, batch_size=2, seq_len=32, draft_steps=2, learning_rate=3e-3, warmup_steps=0, seed=3,
        eval_every=2, eval_prompts=2, eval_prompt_tokens=8, eval_max_tokens=8, checkpoint_every=2,
    )


@pytest.fixture(scope="module")
def straight_run(settings, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "drafter"
    log = td.train(replace(settings, out=str(out)))
    return out, log


def weights(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}


def test_output_is_the_hf_layout_with_training_log(straight_run, settings):
    out, log = straight_run
    assert sorted(p.name for p in out.parent.iterdir()) == ["drafter"]  # no checkpoint, no staging left
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "training.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_assistant" and "per_layer_config" not in config["text_config"]
    saved = json.loads((out / "training.json").read_text())
    assert saved == json.loads(json.dumps(log))
    assert saved["steps"] == 4 and len(saved["losses"]) == 4
    assert [e["step"] for e in saved["evaluations"]] == [0, 2, 4]
    assert saved["mean_accepted_length_before"] >= 1 and saved["mean_accepted_length_after"] >= 1
    assert len(saved["data"]["training_sha256"]) == 64 and saved["settings"]["seed"] == settings.seed
    # frozen: the centroid ordering and the layer scalars are the initial drafter's
    initial = weights(Path(settings.draft_model))
    trained = weights(out)
    assert (trained["masked_embedding.token_ordering"] == initial["masked_embedding.token_ordering"]).all()
    assert trained["masked_embedding.token_ordering"].dtype == np.int64
    assert (trained["model.layers.0.layer_scalar"] == initial["model.layers.0.layer_scalar"]).all()
    assert not np.array_equal(trained["pre_projection.weight"], initial["pre_projection.weight"])


def test_training_lowers_the_loss_on_a_held_out_batch(straight_run, settings, mlx_pairs):
    out, _ = straight_run
    target = mlx_pairs["e2b"].target
    t = td.teacher(target, mx.array(random_ids(2, seed=7)[:, :33]))
    before = td.drafter_loss(load_drafter(settings.draft_model), t, settings.draft_steps).item()
    after = td.drafter_loss(load_drafter(out), t, settings.draft_steps).item()
    assert after < before - 0.5


def test_interrupted_run_resumes_exactly(straight_run, settings, tmp_path, monkeypatch):
    """Same seed, same settings: an interrupted and resumed run equals the straight run, bit for bit."""
    out = tmp_path / "drafter"
    resumed = replace(settings, out=str(out))
    batch = td.data.batch

    def interrupted_at_step_3(*args, **kwargs):
        if args[4] == 3:
            raise KeyboardInterrupt
        return batch(*args, **kwargs)

    monkeypatch.setattr(td.data, "batch", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        td.train(resumed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drafter.checkpoint"]
    monkeypatch.setattr(td.data, "batch", batch)
    with pytest.raises(ValueError, match="--resume"):
        td.train(resumed)
    with pytest.raises(ValueError, match="--seq-len"):
        td.train(replace(resumed, resume=True, seq_len=24))
    log = td.train(replace(resumed, resume=True))
    straight_out, straight_log = straight_run
    assert log["losses"] == straight_log["losses"]
    assert log["evaluations"] == straight_log["evaluations"]
    trained, reference = weights(out), weights(straight_out)
    assert all(np.array_equal(trained[k], reference[k]) for k in reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drafter"]


def test_fresh_self_generated_drafter_round_trips_through_transformers(pairs, settings, tmp_path):
    """A fresh drafter (centroid head from k-means) trained on the target's own text loads in
    transformers' Gemma4AssistantForCausalLM and drafts there as it does here."""
    target_path, _ = pairs["e2b"]
    out = tmp_path / "fresh"
    td.train(replace(settings, out=str(out), draft_model=None, data=[], self_generate=3, eval_prompts=0,
                     hidden_size=32, num_layers=2, num_heads=2, num_centroids=16, centroid_top_k=4, steps=2))
    target, _, drafter = load(target_path, draft_model=out)
    assistant = load_hf_assistant(out)
    assert sorted(np.array(drafter.masked_embedding.token_ordering).tolist()) == list(range(256))
    ids = random_ids(1, seed=5)[0, : 2 * WINDOW].tolist()
    kv, hidden = full_length_state(target, ids[:-1])
    embedding = target.embed(mx.array([ids[-1]]))
    state, ours_hidden = drafter.step(embedding[None], mx.array(hidden)[None, None], len(ids) - 1,
                                      target.drafter_kv(prefilled(target, ids[:-1])))
    ref_logits, ref_hidden = hf_draft_step(assistant, np.array(embedding)[0], hidden, len(ids) - 1, kv)
    ours = np.array(drafter.logits(state)).reshape(-1)
    candidates = np.isfinite(ours)
    assert np.abs(ours[candidates] - ref_logits[candidates]).max() < 1e-4
    assert np.abs(np.array(ours_hidden).reshape(-1) - ref_hidden).max() < 1e-4


def prefilled(target, ids):
    cache = target.make_cache(4)
    mx.eval(target(mx.array([ids]), cache))
    return cache


def test_quantized_target_trains(pairs, settings, tmp_path):
    from gemma_mtp_mlx.convert import convert_pair

    target_path, assistant = pairs["e2b"]
    pair = tmp_path / "q8"
    convert_pair(str(target_path), str(assistant), pair, dtype="float32", quantize=True, q_bits=8, q_group_size=32)
    log = td.train(replace(settings, model=str(pair), out=str(tmp_path / "drafter"), steps=2, eval_prompts=0,
                           checkpoint_every=0))
    assert np.isfinite(log["losses"]).all()
    load(pair, draft_model=tmp_path / "drafter")


def test_adapter_path_applies_an_mlx_lm_adapter(pairs, tmp_path):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    target_path = str(pairs["e2b"][0])
    config = {"fine_tune_type": "lora", "num_layers": 2,
              "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
    adapted, _ = td.load_frozen_target(target_path, None)
    linear_to_lora_layers(adapted.model, config["num_layers"], config["lora_parameters"])
    lora = {k: 0.1 * mx.random.normal(v.shape, key=mx.random.key(i))
            for i, (k, v) in enumerate(tree_flatten(adapted.model.parameters())) if k.endswith(("lora_a", "lora_b"))}
    assert lora
    adapted.model.load_weights(list(lora.items()), strict=False)
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), lora)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    ids = mx.array(random_ids(1)[:, :20])
    loaded, _ = td.load_frozen_target(target_path, str(tmp_path))
    base, _ = td.load_frozen_target(target_path, None)
    hidden = {name: np.array(td.teacher(model, ids).hidden) for name, model in
              (("loaded", loaded), ("adapted", adapted), ("base", base))}
    assert np.abs(hidden["loaded"] - hidden["adapted"]).max() < 1e-5
    assert np.abs(hidden["loaded"] - hidden["base"]).max() > 1e-2
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        td.load_frozen_target(target_path, str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------
# Data and bad input


def test_jsonl_text_and_chat_messages_use_the_target_tokenizer(mlx_pairs, tmp_path):
    tokenizer = mlx_pairs["e2b"].tokenizer
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the model"}]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "def f(x):"}) + "\n\n" + json.dumps({"messages": messages}) + "\n")
    text, chat = read_documents([str(path)], tokenizer)
    assert text == tokenizer.encode("def f(x):", add_special_tokens=False)
    rendered = tokenizer.apply_chat_template(messages, tokenize=True)
    assert rendered[0] == tokenizer.bos_token_id and chat == list(rendered[1:])
    path.write_text('{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:1 needs a \"text\""):
        read_documents([str(path)], tokenizer)


@pytest.mark.parametrize("case, error, message", [
    ("no data", ValueError, "no training data"),
    ("missing data", DataError, "does not exist"),
    ("short data", DataError, "fewer than one training sequence"),
    ("drafter does not fit", CheckpointError, "drafter expects backbone_hidden_size 32, the target has"),
    ("out exists", ValueError, "already exists"),
    ("nothing to resume", ValueError, "nothing to resume"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, error, message, settings, narrow_assistant, tmp_path):
    out = tmp_path / "run" / "drafter"
    s = replace(settings, out=str(out))
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 3)
    if case == "no data":
        s = replace(s, data=[])
    elif case == "missing data":
        s = replace(s, data=[str(tmp_path / "nowhere")])
    elif case == "short data":
        s = replace(s, data=[str(short)], eval_data=[settings.data[0]])
    elif case == "drafter does not fit":
        s = replace(s, draft_model=str(narrow_assistant))
    elif case == "out exists":
        out.mkdir(parents=True)
    elif case == "nothing to resume":
        s = replace(s, resume=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(error, match=message):
        td.train(s)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cli_error_is_one_line(settings, tmp_path, capsys):
    out = tmp_path / "drafter"
    out.mkdir()
    code = cli.main(["train-drafter", "--model", settings.model, "--data", settings.data[0], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("gemma-mtp: error: ") and err.count("\n") == 1 and "already exists" in err
