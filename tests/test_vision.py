"""Images in: the vision encoder matches transformers' soft tokens, and greedy speculative
output with images equals transformers' plain greedy output, on an E2B-like target and a
31B-like one whose image blocks attend both ways on sliding layers."""

import io

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import WINDOW, eos_tokens
from hf_reference import hf_greedy_with_margin, hf_image_features, hf_image_inputs, load_make_fixtures
from gemma_mtp_mlx import load, stream_generate
from gemma_mtp_mlx.media.merge import merge_embeddings
from gemma_mtp_mlx.validate import InvalidInput

MAX_TOKENS = 3 * WINDOW + 12  # generate past 3x the sliding window
EOS = 1
FIXTURES = load_make_fixtures()
IMAGE = FIXTURES.IMAGE_ID
FIRST_TEXT_ID = FIXTURES.EOI_ID + 1  # random prompt text stays clear of the special and image ids

VISION_PAIRS = {
    "vision": ("vision_target", "assistant_centroid"),  # E2B-like
    "vision_dense": ("vision_dense_target", "assistant_dense"),  # 31B-like, bidirectional image blocks
}
IMAGE_SIZES = [(20, 30), (64, 16), (5, 90), (33, 33)]  # height, width: several aspect ratios


@pytest.fixture(scope="session")
def vision_pairs(fixture_dir):
    return {name: load(fixture_dir / t, draft_model=fixture_dir / a) for name, (t, a) in VISION_PAIRS.items()}


@pytest.fixture(scope="session")
def hf_vision_targets(fixture_dir):
    return {
        name: AutoModelForImageTextToText.from_pretrained(fixture_dir / t, dtype=torch.float32).eval()
        for name, (t, _) in VISION_PAIRS.items()
    }


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_prompt(rng, num_images: int) -> list[int]:
    """BOS, then text and image placeholders in turn, ending in text."""
    prompt = [FIXTURES.BOS_ID]
    for _ in range(num_images):
        prompt += rng.integers(FIRST_TEXT_ID, 256, size=int(rng.integers(1, 8))).tolist() + [IMAGE]
    return prompt + rng.integers(FIRST_TEXT_ID, 256, size=int(rng.integers(1, 8))).tolist()


def tokens(responses) -> list[int]:
    return [r.token for r in responses]


_references = {}


def decisive_image_references(pair, target, hf_target, count=2):
    """Prompts with one and two images whose transformers greedy path has no near-tie
    (top-2 gap under 1e-3): (prompt, images, reference tokens)."""
    found = _references.setdefault(pair, [])
    rng = np.random.default_rng(3)
    while len(found) < count:
        num_images = 1 + len(found) % 2
        prompt = image_prompt(rng, num_images)
        images = [random_image(*IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))], seed=int(rng.integers(1 << 30)))
                  for _ in range(num_images)]
        ids, _ = target.vision.prepare(prompt, images)
        inputs = hf_image_inputs(target.vision.processor(images), ids, IMAGE)
        reference, margin = hf_greedy_with_margin(hf_target, ids, MAX_TOKENS, eos_token_id=EOS, **inputs)
        if margin > 1e-3:
            found.append((prompt, images, reference))
    return found


@pytest.mark.parametrize("pair", list(VISION_PAIRS))
@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_soft_tokens_match_transformers(pair, size, vision_pairs, hf_vision_targets):
    target = vision_pairs[pair][0]
    (processed,) = target.vision.processor([random_image(*size)])
    ours = np.array(target.vision.encoder(processed.pixel_values, processed.position_ids))
    reference = hf_image_features(hf_vision_targets[pair], processed)
    assert ours.shape == reference.shape == (processed.num_soft_tokens, target.hidden_size)
    assert np.abs(ours - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())


@pytest.mark.parametrize("pair", list(VISION_PAIRS))
def test_greedy_speculative_with_images_equals_transformers_past_window(pair, vision_pairs, hf_vision_targets):
    target, tokenizer, drafter = vision_pairs[pair]
    for prompt, images, reference in decisive_image_references(pair, target, hf_vision_targets[pair]):
        with eos_tokens(tokenizer, [EOS]):
            plain = tokens(stream_generate(target, tokenizer, prompt, images=images, max_tokens=MAX_TOKENS))
            assert plain == reference
            for k in (1, 3, "auto"):
                out = stream_generate(target, tokenizer, prompt, images=images, draft_model=drafter,
                                      num_draft_tokens=k, max_tokens=MAX_TOKENS)
                assert tokens(out) == reference, f"k={k} prompt={prompt}"


@pytest.mark.parametrize("pair", list(VISION_PAIRS))
def test_prefill_chunks_never_cut_an_image(pair, vision_pairs, hf_vision_targets):
    """A prefill step far shorter than an image: each image still goes in whole."""
    target, tokenizer, drafter = vision_pairs[pair]
    prompt, images, reference = decisive_image_references(pair, target, hf_vision_targets[pair])[1]
    with eos_tokens(tokenizer, [EOS]):
        out = stream_generate(target, tokenizer, prompt, images=images, draft_model=drafter, num_draft_tokens=3,
                              max_tokens=MAX_TOKENS, prefill_step_size=5)
        assert tokens(out) == reference


@pytest.mark.parametrize("pair", list(VISION_PAIRS))
def test_image_in_a_later_turn_on_a_reused_cache(pair, vision_pairs, hf_vision_targets):
    """A text turn, then an image after the cached context: the same as transformers
    reading the whole conversation at once."""
    from gemma_mtp_mlx import make_prompt_cache

    target, tokenizer, drafter = vision_pairs[pair]
    rng = np.random.default_rng(12)
    first = [FIXTURES.BOS_ID] + rng.integers(FIRST_TEXT_ID, 256, size=2 * WINDOW).tolist()
    second = image_prompt(rng, 1)[1:]
    image = random_image(33, 33, seed=5)
    cache = make_prompt_cache(target, 3)
    with eos_tokens(tokenizer, []):
        answer = tokens(stream_generate(target, tokenizer, first, draft_model=drafter, num_draft_tokens=3,
                                        max_tokens=10, prompt_cache=cache))
        assert IMAGE not in answer, "pick another seed: the answer holds an image placeholder"
        out = tokens(stream_generate(target, tokenizer, answer[-1:] + second, images=[image], draft_model=drafter,
                                     num_draft_tokens=3, max_tokens=MAX_TOKENS, prompt_cache=cache))
    conversation, _ = target.vision.prepare(first + answer + second, [image])
    inputs = hf_image_inputs(target.vision.processor([image]), conversation, IMAGE)
    reference, margin = hf_greedy_with_margin(hf_vision_targets[pair], conversation, MAX_TOKENS, **inputs)
    assert margin > 1e-3, "pick another seed: the reference path has a near-tie"
    assert out == reference


def test_last_response_reports_image_tokens_and_encoder_time(vision_pairs):
    target, tokenizer, drafter = vision_pairs["vision"]
    prompt = [FIXTURES.BOS_ID, 20, IMAGE, 30, IMAGE, 40]
    images = [random_image(20, 30), random_image(5, 90)]
    last = list(stream_generate(target, tokenizer, prompt, images=images, draft_model=drafter, max_tokens=3))[-1]
    expected = sum(p.num_soft_tokens for p in target.vision.processor(images))
    assert last.stats.media_tokens == expected == 60 + 35
    assert last.prompt_tokens == len(prompt) + expected + 2 * 2 - 2  # each placeholder: <|image>, n ids, <image|>
    assert last.stats.encoder_seconds > 0
    assert "95 image tokens" in last.stats.summary()


def test_load_reports_modalities(vision_pairs, fixture_dir):
    assert vision_pairs["vision"][0].modalities == ("text", "image")
    assert load(fixture_dir / "multimodal_target")[0].modalities == ("text",)  # a gemma4 layout without a tower
    assert load(fixture_dir / "e2b_target")[0].modalities == ("text",)


@pytest.mark.parametrize("name", ["multimodal_target", "e2b_target"])
def test_text_only_checkpoint_given_images_is_a_clear_error(name, fixture_dir):
    target, tokenizer, _ = load(fixture_dir / name)
    with pytest.raises(InvalidInput, match="no vision tower"):
        list(stream_generate(target, tokenizer, [2, 20, 30], images=[random_image(8, 8)], max_tokens=2))


@pytest.mark.parametrize("prompt, num_images, message", [
    ([2, 20, IMAGE, 30, IMAGE], 1, "more image placeholders than the 1 images"),
    ([2, 20, IMAGE, 30], 2, "1 image placeholders but 2 images"),
    ([2, 20, 30], 1, "0 image placeholders but 1 images"),
    ([2, 20, IMAGE, 30], 0, "more image placeholders than the 0 images"),
    ([2, FIXTURES.BOI_ID] + [IMAGE] * 59 + [FIXTURES.EOI_ID], 1, "image 0 has 60 soft tokens but its expanded"),
])
def test_placeholder_and_image_counts_must_match(prompt, num_images, message, vision_pairs):
    target, tokenizer, _ = vision_pairs["vision"]
    images = [random_image(20, 30)] * num_images
    with pytest.raises(InvalidInput, match=message):
        list(stream_generate(target, tokenizer, prompt, images=images, max_tokens=2))


def test_an_expanded_placeholder_is_taken_as_it_is(vision_pairs):
    target = vision_pairs["vision"][0]
    image = random_image(20, 30)
    expanded, _ = target.vision.prepare([2, 20, IMAGE, 30], [image])
    again, media = target.vision.prepare(expanded, [image])
    assert again == expanded and media.blocks == [(3, 63)]


def test_soft_token_count_mismatch_never_wraps_around():
    embeddings = mx.zeros((1, 6, 4))
    is_media = np.array([False, True, True, True, False, False])
    with pytest.raises(ValueError, match="3 image token positions but 2 image soft tokens"):
        merge_embeddings(embeddings, is_media, mx.ones((2, 4)))
    merged = merge_embeddings(embeddings, is_media, mx.arange(12, dtype=mx.float32).reshape(3, 4))
    assert np.array(merged)[0, :, 0].tolist() == [0, 0, 4, 8, 0, 0]


@pytest.mark.parametrize("image, message", [
    (b"not an image", "could not be read as an image"),
    ("/nonexistent/cat.png", "is not a file"),
    (np.zeros((4, 4, 3), dtype=np.int64), "int64 array"),
    (np.full((4, 4), 2.0), "outside \\[0, 1\\]"),
    (12, "is a int"),
])
def test_unreadable_images_are_clear_errors(image, message, vision_pairs):
    target, tokenizer, _ = vision_pairs["vision"]
    with pytest.raises(InvalidInput, match=message):
        list(stream_generate(target, tokenizer, [2, 20, IMAGE, 30], images=[image], max_tokens=2))


def test_images_read_from_paths_bytes_and_pil_alike(vision_pairs, tmp_path):
    from PIL import Image

    target = vision_pairs["vision"][0]
    array = random_image(20, 30)
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG")
    (tmp_path / "image.png").write_bytes(png.getvalue())
    processed = target.vision.processor([array, png.getvalue(), tmp_path / "image.png", Image.fromarray(array)])
    for other in processed[1:]:
        assert np.array_equal(other.pixel_values, processed[0].pixel_values)


def test_cli_generate_with_images_matches_the_python_api(fixture_dir, vision_pairs, tmp_path):
    import json
    from PIL import Image

    from gemma_mtp_mlx.generate import chat_prompt
    from test_cli import cli

    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, size in zip(paths, IMAGE_SIZES):
        Image.fromarray(random_image(*size)).save(path)
    target_dir, assistant_dir = VISION_PAIRS["vision"]
    run = cli("generate", "--model", fixture_dir / target_dir, "--draft-model", fixture_dir / assistant_dir,
              "--prompt", "what is this", "--image", paths[0], "--image", paths[1], "--max-tokens", 12,
              "--output", "json")
    assert run.returncode == 0, run.stderr
    target, tokenizer, drafter = vision_pairs["vision"]
    prompt = chat_prompt(tokenizer, "<|image|><|image|>\nwhat is this")
    api = list(stream_generate(target, tokenizer, prompt, images=paths, draft_model=drafter, max_tokens=12))
    result = json.loads(run.stdout)
    assert result["tokens"] == [r.token for r in api]
    assert result["stats"]["media_tokens"] == 60 + 64
