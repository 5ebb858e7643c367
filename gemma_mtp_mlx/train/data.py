"""Training text for `gemma-mtp train-drafter`: files, directories, JSONL, or the target's own.

Every document is tokenized with the target's tokenizer and the documents are joined into
one token stream, each followed by EOS. A training sequence is BOS + `seq_len` tokens read
from a random offset of that stream; the offsets of step `s` depend only on (seed, s), so
a resumed run sees exactly the batches an uninterrupted one would.
"""

import hashlib
import json
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np


class DataError(ValueError):
    """Training data that cannot be used, with what to do about it."""


def _files(path: Path) -> List[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path} is an empty directory: give text files, directories of them, or JSONL")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"{path} does not exist: give text files, directories of them, or JSONL files")


def _jsonl_documents(path: Path, tokenizer) -> Iterable[List[int]]:
    """One document per line: {"text": ...} or {"messages": [...]} (rendered with the chat template)."""
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number} is not valid JSON ({e.msg})") from e
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            yield tokenizer.encode(record["text"], add_special_tokens=False)
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            if getattr(tokenizer, "chat_template", None) is None:
                raise DataError(f"{path}:{number} holds chat messages, but the target has no chat template: "
                                "give plain text ({\"text\": ...}) instead")
            ids = list(tokenizer.apply_chat_template(record["messages"], tokenize=True))
            yield ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids  # BOS starts each sequence
        else:
            raise DataError(f"{path}:{number} needs a \"text\" string or a \"messages\" list")


def _is_binary(data: bytes) -> bool:
    return b"\0" in data[:8192]


def read_documents(paths: Sequence[str], tokenizer) -> List[List[int]]:
    """Token ids of every document under `paths` (files in sorted order within directories).

    A `.jsonl` file holds one document per line; any other file is one document (files
    with NUL bytes are skipped as binary).
    """
    documents = []
    for path in map(Path, paths):
        for f in _files(path.expanduser()):
            if f.suffix == ".jsonl":
                documents.extend(_jsonl_documents(f, tokenizer))
                continue
            data = f.read_bytes()
            if data.strip() and not _is_binary(data):
                documents.append(tokenizer.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False))
    documents = [d for d in documents if d]
    if not documents:
        raise DataError(f"no text found in {', '.join(map(str, paths))}: "
                        "give text files, directories of them, or JSONL with \"text\" or \"messages\"")
    return documents


def self_generate(target, tokenizer, count: int, max_tokens: int, prompts: Sequence[List[int]],
                  temp: float, seed: int) -> List[List[int]]:
    """`count` texts the target writes itself (sampled at `temp`), each from the start of a
    prompt document (cycled), or from BOS alone when there are no prompts."""
    from ..generate import stream_generate

    bos = [tokenizer.bos_token_id]
    documents = []
    for i in range(count):
        prompt = bos + list(prompts[i % len(prompts)][:32]) if prompts else bos
        generated = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=max_tokens,
                                                       temp=temp, seed=seed + i)]
        documents.append(prompt[1:] + generated)
    return documents


def token_stream(documents: Sequence[List[int]], eos: int) -> np.ndarray:
    """The documents joined into one int32 stream, each followed by `eos`."""
    return np.concatenate([np.asarray(list(d) + [eos], dtype=np.int32) for d in documents])


def digest(stream: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(stream, dtype=np.int32).tobytes()).hexdigest()


def check_long_enough(stream: np.ndarray, seq_len: int, what: str) -> None:
    if len(stream) <= seq_len:
        raise DataError(f"the {what} holds {len(stream)} tokens, fewer than one training sequence of "
                        f"{seq_len + 1}: give more text or a smaller --seq-len")


def batch(stream: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int, bos: int) -> np.ndarray:
    """Step `step`'s batch: [batch_size, 1 + seq_len] int32, BOS then a window of the stream."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len + 1, size=batch_size)
    rows = np.stack([stream[s : s + seq_len] for s in starts])
    return np.concatenate([np.full((batch_size, 1), bos, dtype=np.int32), rows], axis=1)


def eval_prompts(stream: np.ndarray, count: int, length: int, bos: int) -> List[List[int]]:
    """`count` prompts of BOS + `length` tokens, consecutive chunks from the start of `stream`."""
    if len(stream) < count * length:
        raise DataError(f"the evaluation text holds {len(stream)} tokens, fewer than --eval-prompts {count} x "
                        f"--eval-prompt-tokens {length}: give more --eval-data or fewer, shorter prompts")
    return [[bos] + stream[i * length : (i + 1) * length].tolist() for i in range(count)]


def split_eval(stream: np.ndarray, eval_stream: Optional[np.ndarray], count: int, length: int):
    """(training stream, evaluation stream): without separate evaluation data, the last
    `count * length` tokens are held out of training."""
    if eval_stream is not None or count == 0:
        return stream, eval_stream
    held = count * length
    if len(stream) <= held:
        raise DataError(f"the data holds {len(stream)} tokens, not enough to hold out {held} for evaluation: "
                        "give --eval-data, or fewer --eval-prompts")
    return stream[:-held], stream[-held:]
