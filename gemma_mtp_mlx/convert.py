"""Convert a Gemma 4 target and its MTP drafter from Hugging Face to one MLX pair directory.

OUT/          the target in mlx-lm's converted layout (config.json, model*.safetensors,
              tokenizer files, generation_config.json) and a README.md model card
OUT/drafter/  the drafter: config.json (the HF form `load_drafter` reads, plus
              "quantization"), model.safetensors, generation_config.json

`gemma_mtp_mlx.load(OUT)` opens the pair. The target goes through mlx-lm (load, cast,
quantize with the model's own predicate, save); the drafter is ours. Everything is written
into a temporary directory beside OUT and renamed into place at the end, so a failed or
interrupted conversion leaves neither OUT nor the temporary directory behind. The sources
are only read.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

from . import __version__
from .checkpoint import (
    CheckpointError,
    check_model_type,
    published_text_config,
    quantization,
    read_config,
    resolve_path,
)
from .drafter import Drafter, check_pair, load_drafter
from .loading import PAIR_DRAFTER_DIR
from .target import Target, mlx_lm_config

DTYPES = ("bfloat16", "float16", "float32")
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)

# Kept in `dtype` when the drafter is quantized: the centroid scores choose which token
# blocks are scored at all. It is ~0.7% of an E2B drafter's weights; quantized to 4 bits
# (random 256x2048 layer, group 64) it picks the exact float top-32 set for 1% of inputs.
UNQUANTIZED_DRAFTER_MODULES = ("masked_embedding.centroids",)

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*")


@dataclass
class PartReport:
    source: str  # the Hub repo id or local directory as given
    dtype: str
    quantization: Optional[Dict]  # {"group_size", "bits", "mode"}, None when unquantized
    size: int  # bytes written for this part
    peak_memory: int  # bytes: MLX peak memory while converting this part, above what was in use before


@dataclass
class ConversionReport:
    out: Path
    target: PartReport
    drafter: PartReport

    @property
    def size(self) -> int:
        """Bytes of everything written under `out`."""
        return self.target.size + self.drafter.size

    @property
    def peak_memory(self) -> int:
        return max(self.target.peak_memory, self.drafter.peak_memory)

    def summary(self) -> str:
        def part(name: str, p: PartReport) -> str:
            return (f"{name}: {p.source} -> {p.dtype}, {_describe_quantization(p.quantization)}, "
                    f"{_format_bytes(p.size)}, peak memory {_format_bytes(p.peak_memory)}")

        return "\n".join([
            f"converted pair: {self.out}",
            part("target", self.target),
            part("drafter", self.drafter),
            f"converted size: {_format_bytes(self.size)}",
            f"peak conversion memory: {_format_bytes(self.peak_memory)}",
        ])


def convert_pair(
    model: str,
    draft_model: str,
    out: Union[str, Path],
    *,
    dtype: str = "bfloat16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    draft_q_bits: Union[str, int, None] = "same",
    overwrite: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> ConversionReport:
    """Convert a target (`model`) and its drafter (`draft_model`) into the pair directory `out`.

    `dtype` is the dtype of every floating weight that is not quantized. `quantize` packs
    the target to `q_bits` with groups of `q_group_size`; `draft_q_bits` is "same" (follow
    the target), 4, 8, or None / "none" (keep the drafter unquantized). An existing
    non-empty `out` is replaced only with `overwrite`; it stays intact if the conversion
    fails. `progress` receives one line per stage.
    """
    say = progress or (lambda _: None)
    target_quant, drafter_quant = _quantization_options(dtype, quantize, q_bits, q_group_size, draft_q_bits)
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)

    say(f"resolving {model} and {draft_model}")
    target_src, drafter_src = resolve_path(str(model)), resolve_path(str(draft_model))
    for src in (target_src, drafter_src):
        _check_apart(src, out)
    target_config = _check_target_source(target_src)
    _check_drafter_source(drafter_src)

    staging = _make_staging_dir(out)
    try:
        target_model = _load_target_lazily(target_src, target_config)

        say(f"converting the drafter {draft_model}")
        baseline = _start_peak_memory()
        drafter = load_drafter(drafter_src)
        check_pair(Target(target_model), drafter)
        _convert_drafter(drafter, drafter_src, staging / PAIR_DRAFTER_DIR, dtype, drafter_quant)
        del drafter
        drafter_peak = mx.get_peak_memory() - baseline

        say(f"converting the target {model}")
        baseline = _start_peak_memory()
        _convert_target(target_model, target_config, target_src, staging, dtype, target_quant)
        del target_model
        target_peak = mx.get_peak_memory() - baseline

        drafter_size = _directory_size(staging / PAIR_DRAFTER_DIR)
        report = ConversionReport(
            out=out,
            target=PartReport(str(model), dtype, target_quant, 0, target_peak),
            drafter=PartReport(str(draft_model), dtype, drafter_quant, drafter_size, drafter_peak),
        )
        _write_model_card(staging, report)
        report.target.size = _directory_size(staging) - drafter_size
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return report


# ---------------------------------------------------------------------------
# Checks, all before anything heavy happens


def _quantization_options(dtype, quantize, q_bits, q_group_size, draft_q_bits):
    """(target quantization, drafter quantization): dicts for nn.quantize, or None."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if q_bits not in Q_BITS:
        raise ValueError(f"q_bits must be 4 or 8, got {q_bits!r}")
    if q_group_size not in Q_GROUP_SIZES:
        raise ValueError(f"q_group_size must be one of 32, 64, 128, got {q_group_size!r}")
    target = dict(group_size=q_group_size, bits=q_bits, mode="affine") if quantize else None
    choice = "none" if draft_q_bits is None else str(draft_q_bits).lower()
    if choice == "same":
        return target, target
    if choice == "none":
        return target, None
    if choice not in ("4", "8"):
        raise ValueError(f"draft_q_bits must be 'same', 4, 8 or 'none', got {draft_q_bits!r}")
    return target, dict(group_size=q_group_size, bits=int(choice), mode="affine")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link: give the directory it points to, or another one")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory: choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty: choose another output directory "
            "or pass --overwrite (overwrite=True) to replace it"
        )


def _check_apart(src: Path, out: Path) -> None:
    """Refuse an output that would write into, or replace, a source."""
    src, dst = src.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ValueError(
            f"the output {out} overlaps the source {src}: the source is never modified, "
            "choose an output directory outside it"
        )


def _check_target_source(path: Path) -> Dict:
    config = read_config(path)
    check_model_type(path, config, "target")
    _check_unquantized(path, config)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise CheckpointError(
            f"{path} has no tokenizer.json or tokenizer.model, so the converted target could not "
            "be loaded: convert from the complete Hugging Face checkpoint"
        )
    return config


def _check_drafter_source(path: Path) -> None:
    config = read_config(path)
    check_model_type(path, config, "drafter")
    _check_unquantized(path, config)


def _check_unquantized(path: Path, config: Dict) -> None:
    if quantization(config) or quantization(config.get("text_config") or {}):
        raise CheckpointError(
            f"{path} is already quantized: convert from the original unquantized Hugging Face checkpoint"
        )


def _load_target_lazily(path: Path, config: Dict) -> nn.Module:
    """The target through mlx-lm, weights not yet read (mx.load checks the file headers)."""
    try:
        model, _ = load_model(path, lazy=True, model_config=mlx_lm_config(config))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} has no model*.safetensors weight files") from e
    except RuntimeError as e:  # mx.load: truncated or corrupt safetensors
        raise CheckpointError(
            f"{path}: a weight file could not be read ({e}); download the checkpoint again"
        ) from e
    except ValueError as e:  # load_weights: names or shapes differ from the config
        raise CheckpointError(f"{path}: the target weights do not match its config.json ({e})") from e
    return model


# ---------------------------------------------------------------------------
# The two parts


def _convert_drafter(drafter: Drafter, src: Path, dst: Path, dtype: str, quant: Optional[Dict]) -> None:
    """Cast, quantize (all but norms and UNQUANTIZED_DRAFTER_MODULES) and save the drafter."""
    _cast_and_quantize(drafter, getattr(mx, dtype), quant)
    _save_weights(dst, drafter)
    config = read_config(src)
    config["text_config"] = published_text_config(config.get("text_config") or {})
    _set_dtype(config, dtype)
    if quant:
        config["quantization"] = dict(quant)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", dst)


def _cast_and_quantize(drafter: Drafter, dtype: mx.Dtype, quant: Optional[Dict]) -> None:
    """Cast every floating array to `dtype` (one at a time, so at most one extra copy is
    alive), then quantize the Linear and Embedding layers except UNQUANTIZED_DRAFTER_MODULES
    and those whose input size the group size does not divide."""
    for _, module in drafter.named_modules():
        for key, value in module.items():
            floating = isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating)
            if floating and value.dtype != dtype:
                module[key] = value.astype(dtype)
                mx.eval(module[key])
    if not quant:
        return

    def predicate(path: str, module: nn.Module) -> bool:
        return (hasattr(module, "to_quantized")
                and path not in UNQUANTIZED_DRAFTER_MODULES
                and module.weight.shape[-1] % quant["group_size"] == 0)

    nn.quantize(drafter, group_size=quant["group_size"], bits=quant["bits"], mode=quant["mode"],
                class_predicate=predicate)
    if not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in drafter.modules()):
        raise ValueError(
            f"no drafter layer has an input size divisible by q_group_size {quant['group_size']}: "
            "choose a smaller --q-group-size"
        )


def _convert_target(model: nn.Module, config: Dict, src: Path, dst: Path, dtype: str,
                    quant: Optional[Dict]) -> None:
    """Cast, quantize (mlx-lm, the model's own predicate) and save the target with its tokenizer."""
    saved_config = _converted_target_config(config)
    _set_dtype(saved_config, dtype)
    # Lazy: each weight is read, cast and packed when its shard is saved.
    to = getattr(mx, dtype)
    model.update(tree_map(lambda v: v.astype(to) if mx.issubdtype(v.dtype, mx.floating) else v,
                          model.parameters()))
    if quant:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints bits per weight
            model, saved_config = quantize_model(model, saved_config, quant["group_size"], quant["bits"])
        if not any(hasattr(m, "scales") for m in model.modules()):
            raise ValueError(
                f"no target layer has an input size divisible by q_group_size {quant['group_size']}: "
                "choose a smaller --q-group-size"
            )
    _save_weights(dst, model)
    save_config(saved_config, config_path=dst / "config.json")
    for pattern in (*TOKENIZER_FILES, "generation_config.json"):
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy(f, dst)


def _save_weights(dst: Path, module: nn.Module) -> None:
    """mlx-lm's sharded save, then a read-back of every shard's header: MLX does not
    report a failed write (a full disk), but a short file no longer matches its header."""
    try:
        save_model(dst, module, donate_model=True)
        for f in sorted(dst.glob("*.safetensors")):
            mx.load(str(f))
    except RuntimeError as e:
        raise OSError(
            f"could not write the weights to {dst} ({e}); check the free disk space and convert again"
        ) from e


def _converted_target_config(config: Dict) -> Dict:
    """The source config as mlx-lm reads it (`mlx_lm_config`: a 12B's mapped onto gemma4 /
    gemma4_text), without vision/audio towers (they are not converted)."""
    mapped = mlx_lm_config(config)
    if "text_config" not in mapped:
        return mapped
    converted = {**config, **mapped}
    converted.pop("vision_config", None)
    converted.pop("audio_config", None)
    return converted


def _set_dtype(config: Dict, dtype: str) -> None:
    for c in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in c:
                c[key] = dtype


# ---------------------------------------------------------------------------
# Output directory


def _make_staging_dir(out: Path) -> Path:
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(
            f"cannot write the converted pair to {out}: {existing} is a file, not a directory; "
            "choose another output directory"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    except OSError as e:
        raise OSError(
            f"cannot write the converted pair to {out} ({e.strerror or e}: {e.filename}); "
            "choose an output directory in a writable location"
        ) from e


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging directory to `out`; an old `out` is removed only after."""
    staging.chmod(0o777 & ~_umask())  # mkdtemp made it private; `out` gets the usual mode
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    return umask


def _start_peak_memory() -> int:
    """Reset MLX's peak memory; returns the memory already in use, to subtract from the peak."""
    mx.reset_peak_memory()
    return mx.get_active_memory()


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _write_model_card(path: Path, report: ConversionReport) -> None:
    parts = (("target", report.target, "./"), ("drafter", report.drafter, f"{PAIR_DRAFTER_DIR}/"))
    hub_ids = [p.source for _, p, _ in parts if not Path(p.source).expanduser().is_dir()]
    base_model = "".join(f"\n- {s}" for s in hub_ids)
    front_matter = ["library_name: mlx", "pipeline_tag: text-generation",
                    "tags:\n- mlx\n- gemma4\n- speculative-decoding"]
    if base_model:
        front_matter.append(f"base_model:{base_model}")
    rows = "\n".join(
        f"| {name} | `{p.source}` | `{where}` | {p.dtype} | {_describe_quantization(p.quantization)} |"
        for name, p, where in parts
    )
    kept = ""
    if report.drafter.quantization:
        kept = f"\nThe drafter's norms stay unquantized, in {report.drafter.dtype}."
        if json.loads((path / PAIR_DRAFTER_DIR / "config.json").read_text()).get("use_ordered_embeddings"):
            kept += (f" So does its centroid layer (`{', '.join(UNQUANTIZED_DRAFTER_MODULES)}`), and "
                     "`masked_embedding.token_ordering` stays an exact int32 array.")
        kept += "\n"
    (path / "README.md").write_text(f"""---
{chr(10).join(front_matter)}
---

# {report.out.name}

A Gemma 4 target and its Multi-Token-Prediction drafter, converted to MLX with
gemma-mtp-mlx {__version__} (mlx {mx.__version__}).

| part | source | directory | dtype | quantization |
|---|---|---|---|---|
{rows}
{kept}
## Use

```python
from gemma_mtp_mlx import load, generate

model, tokenizer, draft_model = load("{report.out.name}")  # finds {PAIR_DRAFTER_DIR}/ itself
print(generate(model, tokenizer, "Hello", draft_model=draft_model))
```

```bash
gemma-mtp generate --model {report.out.name} --prompt "Hello"
```
""")


def _describe_quantization(quant: Optional[Dict]) -> str:
    return f"{quant['bits']}-bit (group size {quant['group_size']})" if quant else "not quantized"


def _format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# ---------------------------------------------------------------------------
# Command line: `gemma-mtp convert`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="target to convert (gemma4, gemma4_text, gemma4_unified or "
                             "gemma4_unified_text): Hub repo id or local directory")
    parser.add_argument("--draft-model", required=True,
                        help="its gemma4_assistant or gemma4_unified_assistant drafter: "
                             "Hub repo id or local directory")
    parser.add_argument("-o", "--out", required=True,
                        help="output directory for the pair (the drafter goes to OUT/drafter)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="dtype of the weights that are not quantized")
    parser.add_argument("-q", "--quantize", action="store_true",
                        help="quantize the target, and the drafter unless --draft-q-bits none")
    parser.add_argument("--q-bits", type=int, choices=Q_BITS, default=4,
                        help="bits per quantized weight")
    parser.add_argument("--q-group-size", type=int, choices=Q_GROUP_SIZES, default=64,
                        help="weights sharing one scale and bias")
    parser.add_argument("--draft-q-bits", choices=("same", "4", "8", "none"), default="same",
                        help="drafter bits: 'same' follows the target (unquantized without -q), "
                             "'none' keeps it unquantized")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty output directory")


def run(args: argparse.Namespace) -> None:
    """Convert as `args` say and print the report. A SIGTERM cleans up like Ctrl-C."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        report = convert_pair(
            args.model, args.draft_model, args.out,
            dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
            draft_q_bits=args.draft_q_bits, overwrite=args.overwrite,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.summary())
