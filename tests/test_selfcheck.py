"""The exactness self-check: it passes on an exact pair, flags a verify pass that computes
other logits than decoding, and `gemma-mtp doctor` prints it and fails on it."""

import mlx.core as mx
import pytest

from gemma_mtp_mlx import cli
from gemma_mtp_mlx.bench.selfcheck import exactness_check
from gemma_mtp_mlx.target import Target

PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3], [100]]


class PerturbedVerify(Target):
    """A target whose multi-token forwards (verify, prefill) favour one token: what a
    verify kernel that sums differently would do at its worst."""

    def __call__(self, tokens, cache, unsettled=None):
        logits, hidden = super().__call__(tokens, cache, unsettled)
        if tokens.shape[1] > 1:
            logits = logits + 50.0 * (mx.arange(logits.shape[-1]) == 5)
        return logits, hidden


def test_exact_pair_passes(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    check = exactness_check(target, tokenizer, drafter, PROMPTS, num_draft_tokens=3, max_tokens=12)
    assert check["ok"] and check["identical"] == check["prompts"] == len(PROMPTS)
    assert check["first_divergence"] == [None] * len(PROMPTS)
    assert check["argmax_agrees"] and check["max_logit_gap"] < 1e-3
    assert check["dtype"] == "float32" and check["k"] == 3


def test_perturbed_verify_is_flagged(mlx_pairs):
    target, tokenizer, drafter = mlx_pairs["e2b"]
    check = exactness_check(PerturbedVerify(target.model), tokenizer, drafter, PROMPTS,
                            num_draft_tokens=3, max_tokens=12)
    assert not check["ok"] and not check["argmax_agrees"]
    assert check["identical"] < len(PROMPTS)
    assert check["max_logit_gap"] >= 49


def test_doctor_prints_the_check(pairs, capsys):
    target, assistant = pairs["e2b"]
    assert cli.main(["doctor", "--model", str(target), "--draft-model", str(assistant), "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "speculative output == plain output on 4/4 prompts" in out and "OK:" in out


def test_doctor_fails_when_not_exact(pairs, capsys, monkeypatch):
    from gemma_mtp_mlx.bench import selfcheck

    target, assistant = pairs["e2b"]
    real_load = selfcheck.load

    def load_perturbed(*args):
        model, tokenizer, drafter = real_load(*args)
        return PerturbedVerify(model.model), tokenizer, drafter

    monkeypatch.setattr(selfcheck, "load", load_perturbed)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor", "--model", str(target), "--draft-model", str(assistant), "--max-tokens", "6"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "NOT EXACT" in captured.out and "not exact" in captured.err


def test_doctor_bad_options_are_one_line_errors(pairs, capsys):
    target, assistant = pairs["e2b"]
    code = cli.main(["doctor", "--model", str(target), "--draft-model", str(assistant), "--max-tokens", "0"])
    assert code == 1
    assert capsys.readouterr().err.strip() == "gemma-mtp: error: --max-tokens must be at least 1, got 0"
