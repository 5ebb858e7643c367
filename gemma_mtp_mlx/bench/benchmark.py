"""`gemma-mtp bench`: does speculation pay for this pair on this machine, and which k?

Measures, in one process and on the same prompts, plain target decoding through our API,
mlx-lm's own generation of the same target (the ecosystem baseline), and speculative
decoding for each draft length k and temperature. Repeats are interleaved (every
configuration once per repeat, alternating direction) so that drift hits all alike.

Besides tokens/s it measures the two costs that decide the speedup: `c`, a drafter step
relative to one target decode step, and `v(k)`, a target verify forward of k + 1 tokens
relative to one decode step. One round of k drafts then costs v(k) + k * c decode steps
and yields the mean accepted length in tokens, while plain decoding yields one token per
decode step, so the predicted speedup is mean accepted length / (v(k) + k * c).

With planted acceptance (planted.py) it also runs, for each fixed k and each rate A, rounds
whose drafts the target accepts with probability A per position: the measured speedup
over the mean accepted length (the efficiency) then says how much of the bound the runtime
reaches at that acceptance.
"""

import argparse
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler

from .. import distributed
from . import planted, shapes, timeline
from ..adaptive import AUTO, AUTO_MAX_DRAFT_TOKENS, round_cost
from ..arguments import add_format_options, add_pair_options, response_format
from ..cache import rollback_cache
from ..generate import chat_prompt, encode_prompt, stream_generate
from ..loading import DEFAULT_MODEL, DEFAULT_PROMPTS_FILE, as_target
from .selfcheck import exactness_check
from ..stats import SpeculativeStats
from ..structured.grammar import grammar_processor

DEFAULT_KS = (1, 2, 3, 4, 6, 8, AUTO)
DEFAULT_TEMPS = (0.0, 0.7)
DEFAULT_OUT = "bench/results"
DEFAULT_PROMPTS = [
    "Explain in a few paragraphs how a hash map works and when it becomes slow.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring and tests.",
    "Summarise the causes of the French Revolution for a high-school student.",
    "A train leaves at 9:40 and arrives at 13:05. How long is the journey? Show your steps.",
]
TIMING_WARMUP = 3


@dataclass(frozen=True)
class Config:
    kind: str  # "plain" (our API, no drafter), "mlx-lm" (mlx_lm.stream_generate), "speculative", "auto", "planted"
    temp: float
    k: int = 0
    acceptance: Optional[float] = None  # "planted": each draft is the target's own token with this probability
    constrained: bool = False  # under the run's response_format

    @property
    def name(self) -> str:
        what = f"k={self.k}" if self.kind in ("speculative", "planted") else self.kind
        return (f"{what} t={self.temp:g}" + (f" A={self.acceptance:g}" if self.kind == "planted" else "")
                + (" constrained" if self.constrained else ""))

    @property
    def num_draft_tokens(self):
        return AUTO if self.kind == "auto" else self.k or None


@dataclass
class Run:
    tokens: int  # generated tokens
    seconds: float  # wall time of the generation phase (prefill excluded)
    peak_memory_gb: float
    stats: Optional[SpeculativeStats]  # None for mlx-lm
    mask_seconds: float = 0.0  # host time in the grammar's masks (constrained runs)


def run_benchmark(
    model,
    tokenizer,
    draft_model,
    prompts: List[Union[str, List[int]]],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temps: Sequence[float] = DEFAULT_TEMPS,
    max_tokens: int = 128,
    repeats: int = 3,
    seed: int = 0,
    timing_iters: int = 20,
    model_name: Optional[str] = None,
    draft_model_name: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
    planted_acceptance: Sequence[float] = (),
    response_format: Optional[dict] = None,
) -> dict:
    """Benchmark `model` (the target from `load`) with and without `draft_model`.

    Returns a JSON-ready dict: `machine`, `command`, `model`, `draft_model`, `settings`,
    `costs` (decode ms, c, v(k)), `exactness` (selfcheck.exactness_check at the largest
    k) and `configs`, one entry per configuration with its
    median tokens/s over `repeats`, ratio to plain decoding at the same temperature,
    acceptance statistics, peak memory and predicted speedup. `planted_acceptance`: rates A
    for planted rows (kind "planted", greedy only) at each fixed k; the exactness check
    then covers them too (`exactness["planted"]`). `response_format`: plain and each k under
    it too, with the mask time per token, their ratio over constrained plain decoding.
    """
    target = as_target(model)
    ks, temps, acceptances = tuple(ks), tuple(temps), tuple(planted_acceptance)
    _check_options(draft_model, prompts, ks, temps, max_tokens, repeats, acceptances)
    report = progress or (lambda line: None)
    prompts = [encode_prompt(tokenizer, p).tolist() for p in prompts]
    grammar_processor(tokenizer, response_format, target.vocab_size)  # a bad format fails before timing
    configs = _configs(ks, temps, acceptances, response_format is not None)
    planted_by = {}  # A -> a PlantedDrafter per prompt
    if acceptances:
        report("decoding each prompt plainly for the planted drafts")
        planted_by = planted.planted_drafters(target, tokenizer, draft_model, prompts, acceptances,
                                              max_tokens=max_tokens, seed=seed)

    def run(config: Config, i: int, tokens: int) -> Run:
        mx.reset_peak_memory()
        if config.kind == "mlx-lm":
            return _run_mlx_lm(target, tokenizer, prompts[i], config.temp, tokens, seed + i)
        drafter = planted_by[config.acceptance][i] if config.kind == "planted" else draft_model
        return _run_ours(target, tokenizer, drafter, prompts[i], config, tokens, seed + i,
                         response_format if config.constrained else None)

    report(f"warming up {len(configs)} configurations")
    for config in configs:
        run(config, 0, min(max_tokens, 16))
    report("measuring step costs")
    timed_ks = sorted({k for k in ks if k != AUTO} | (set(range(1, AUTO_MAX_DRAFT_TOKENS + 1)) if AUTO in ks else set()))
    costs = measure_costs(target, draft_model, prompts[0], timed_ks, iters=timing_iters)

    runs: Dict[Config, List[List[Run]]] = {config: [] for config in configs}
    for repeat in range(repeats):
        order = configs if repeat % 2 == 0 else configs[::-1]
        for config in order:
            runs[config].append([run(config, i, max_tokens) for i in range(len(prompts))])
            tps = _tokens_per_s(runs[config][-1])
            report(f"repeat {repeat + 1}/{repeats} {config.name}: {tps:.1f} tokens/s")

    report("checking exactness (greedy speculative output == plain output)")
    exactness = _exactness(target, tokenizer, draft_model, prompts, ks, max_tokens, planted_by)
    results = _with_ratios([_summarise(config, runs[config], costs) for config in configs])
    return dict(
        machine=machine_info(),
        command=command_line(),
        model=describe_model(target.model, target.args, target.model.model_type, model_name),
        draft_model=describe_model(draft_model, draft_model.args.text, "gemma4_assistant", draft_model_name),
        settings=dict(ks=list(ks), temps=list(temps), max_tokens=max_tokens, repeats=repeats, seed=seed,
                      prompts=len(prompts), prompt_tokens=[len(p) for p in prompts], timing_iters=timing_iters,
                      planted_acceptance=list(acceptances), response_format=response_format),
        costs=costs,
        exactness=exactness,
        configs=results,
    )


def _exactness(target, tokenizer, drafter, prompts, ks, max_tokens: int, planted_by: dict) -> dict:
    """selfcheck.exactness_check at the largest fixed k, and (`planted`) the same
    comparison with each planted drafter; `ok` needs both."""
    k = max([k for k in ks if k != AUTO] or [AUTO_MAX_DRAFT_TOKENS])
    exactness = exactness_check(target, tokenizer, drafter, prompts, num_draft_tokens=k, max_tokens=max_tokens)
    if planted_by:
        exactness["planted"] = planted.planted_exactness(target, tokenizer, planted_by, prompts,
                                                         num_draft_tokens=k, max_tokens=max_tokens)
        exactness["ok"] = exactness["ok"] and exactness["planted"]["ok"]
    return exactness


def _with_ratios(results: List[dict]) -> List[dict]:
    """Each row's tokens/s over plain decoding's at its temperature, and over the predicted
    speedup and the mean accepted length where there is one."""
    plain = {(r["temp"], r["constrained"]): r["tokens_per_s"] for r in results if r["kind"] == "plain"}
    for r in results:
        r["ratio"] = r["tokens_per_s"] / plain[r["temp"], r["constrained"]]
        if r["predicted_speedup"] is not None:
            r["measured_over_predicted"] = r["ratio"] / r["predicted_speedup"]
            r["efficiency"] = r["ratio"] / r["mean_accepted_length"]
    return results


def _configs(ks, temps, acceptances, constrained: bool = False) -> List[Config]:
    """Per temperature: plain, mlx-lm, each k in `ks`, then each fixed k at each planted
    rate, then (`constrained`) plain and each k under the response_format."""
    return [
        config
        for temp in temps
        for config in [Config("plain", temp), Config("mlx-lm", temp)] + [_draft_config(temp, k) for k in ks]
        + [Config("planted", temp, k, a) for k in ks if k != AUTO for a in acceptances]
        + ([Config("plain", temp, constrained=True)] + [replace(_draft_config(temp, k), constrained=True) for k in ks]
           if constrained else [])
    ]


def _check_options(draft_model, prompts, ks, temps, max_tokens, repeats, acceptances=()) -> None:
    if draft_model is None:
        raise ValueError("the benchmark needs a drafter: pass --draft-model (a gemma4_assistant checkpoint) "
                         "or a converted pair directory")
    if not prompts:
        raise ValueError("no prompts to benchmark: give at least one")
    if not ks or any(k != AUTO and (isinstance(k, str) or k < 1) for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"draft lengths must be distinct integers >= 1 or {AUTO!r}, got {list(ks)}")
    if not temps or any(t < 0 for t in temps) or len(set(temps)) != len(temps):
        raise ValueError(f"temperatures must be distinct numbers >= 0, got {list(temps)}")
    if max_tokens < 1 or repeats < 1:
        raise ValueError(f"max_tokens and repeats must be at least 1, got {max_tokens} and {repeats}")
    if acceptances:
        planted.check_greedy(temps)
        if any(not 0 <= a <= 1 for a in acceptances) or len(set(acceptances)) != len(acceptances):
            raise ValueError(f"planted acceptance rates must be distinct numbers from 0 to 1, got {list(acceptances)}")
        if AUTO in ks and len(ks) == 1:
            raise ValueError(f"planted acceptance is measured at fixed draft lengths: give at least one number in "
                             f"--ks (not only {AUTO})")


def _run_ours(target, tokenizer, drafter, prompt, config: Config, max_tokens: int, seed: int,
              response_format: Optional[dict] = None) -> Run:
    last = None
    k = config.num_draft_tokens
    grammar = grammar_processor(tokenizer, response_format, target.vocab_size)  # the format's own processor
    for last in stream_generate(target, tokenizer, prompt, draft_model=drafter if k else None,
                                num_draft_tokens=k, max_tokens=max_tokens, temp=config.temp, seed=seed,
                                logits_processors=[grammar] if grammar else None):
        pass
    stats = last.stats
    return Run(stats.generation_tokens, stats.generation_tokens / stats.generation_tps, stats.peak_memory, stats,
               grammar.seconds if grammar else 0.0)


def _run_mlx_lm(target, tokenizer, prompt, temp: float, max_tokens: int, seed: int) -> Run:
    mx.random.seed(seed)
    last = None
    for last in mlx_lm.stream_generate(target.model, tokenizer, prompt, max_tokens=max_tokens,
                                       sampler=make_sampler(temp)):
        pass
    return Run(last.generation_tokens, last.generation_tokens / last.generation_tps, last.peak_memory, None)


def _tokens_per_s(runs: List[Run]) -> float:
    """Tokens/s of one repeat: all its prompts' tokens over all their generation time."""
    return sum(r.tokens for r in runs) / sum(r.seconds for r in runs)


def _summarise(config: Config, repeats: List[List[Run]], costs: dict) -> dict:
    by_repeat = [_tokens_per_s(runs) for runs in repeats]
    every_run = [r for runs in repeats for r in runs]
    result = dict(
        name=config.name,
        kind=config.kind,
        k=config.k,
        temp=config.temp,
        tokens_per_s=statistics.median(by_repeat),
        tokens_per_s_by_repeat=by_repeat,
        generation_tokens_by_repeat=[sum(r.tokens for r in runs) for runs in repeats],
        ratio=None,
        mean_accepted_length=None,
        acceptance_by_position=None,
        rejection_rate=None,
        fallback_rate=None,
        peak_memory_gb=max(r.peak_memory_gb for r in every_run),
        round_cost=None,
        predicted_speedup=None,
        measured_over_predicted=None,
        efficiency=None,  # ratio / mean accepted length: the share of the free-round bound reached
        planted_acceptance=config.acceptance,
        constrained=config.constrained,
        mask_ms_per_token=(sum(r.mask_seconds for r in every_run) / sum(r.tokens for r in every_run) * 1e3
                           if config.constrained else None),
    )
    if config.kind != "mlx-lm":
        stats = functools.reduce(SpeculativeStats.merge, [r.stats for r in every_run])  # rates over every round
        result.update(mean_accepted_length=stats.mean_accepted_length,
                      acceptance_by_position=stats.acceptance_by_position,
                      rejection_rate=stats.rejection_rate, fallback_rate=stats.fallback_rate)
    if config.kind in ("speculative", "planted"):
        cost = round_cost(config.k, costs["c"], costs["v"][str(config.k)])
        result.update(round_cost=cost, predicted_speedup=result["mean_accepted_length"] / cost)
    if config.kind == "auto":
        result.update(_auto_summary([r.stats for r in every_run], costs))
    return result


def _draft_config(temp: float, k) -> Config:
    return Config("auto", temp) if k == AUTO else Config("speculative", temp, k)


def _auto_summary(stats: List[SpeculativeStats], costs: dict) -> dict:
    """What `auto` chose (rounds per k) and the speedup the benchmark's cost model predicts
    for those rounds: tokens over the rounds' summed costs in decode steps."""
    rounds_by_k = [sum(column) for column in zip(*(s.rounds_by_k for s in stats))]
    cost = sum(n * round_cost(k, costs["c"], costs["v"][str(k)] if k else 1.0) for k, n in enumerate(rounds_by_k))
    tokens = sum(s.rounds + s.accepted_tokens for s in stats)
    return dict(rounds_by_k=rounds_by_k, round_cost=cost / sum(rounds_by_k), predicted_speedup=tokens / cost)


def measure_costs(target, drafter, prompt: List[int], ks: Sequence[int], iters: int = 20) -> dict:
    """Step costs on a real cache state (the prompt prefilled), medians of `iters` timings.

    decode: one target forward of one token; verify(k): of k + 1 tokens; round(k): k greedy
    draft steps and the verify of their k + 1 tokens, queued as one graph, as a round runs
    them. The drafter step cost is what the drafts add to a round, per draft:
    sum over k of (round(k) - verify(k)) / sum of k. A draft step timed alone
    (`isolated_draft_step_ms`) also pays a host synchronisation and the device's wake-up
    from idle, which a round pays once, inside verify. The timings take turns (decode,
    each verify, each round, the draft step, then again), so drift on the machine hits
    them alike; the cache is rolled back after each, so every timing starts from the same
    state.
    """
    cache = target.make_cache(max(ks))
    logits, hidden = target(mx.array(prompt)[None], cache)
    token = mx.argmax(logits[0, -1:], axis=-1)  # [1]
    hidden = hidden[:, -1:]  # [1, 1, hidden]
    mx.eval(token, hidden, [c.state for c in cache])
    position = len(prompt)

    def drafts(k: int) -> mx.array:
        return drafter.draft(target.embed, token, hidden, position, target.drafter_kv(cache), k)[0]

    def forward(n: int) -> Callable[[], None]:
        inputs = mx.repeat(token, n)[None]  # [1, n]
        return lambda: mx.eval(target(inputs, cache))

    def round_of(k: int) -> Callable[[], None]:
        return lambda: mx.eval(target(mx.concatenate([token, drafts(k).astype(token.dtype)])[None], cache))

    steps = {"decode": forward(1), **{f"verify {k}": forward(k + 1) for k in ks},
             **{f"round {k}": round_of(k) for k in ks}, "draft": lambda: mx.eval(drafts(1))}
    times = {name: [] for name in steps}
    for i in range(TIMING_WARMUP + iters):
        for name, step in steps.items():
            tic = time.perf_counter()
            step()
            if i >= TIMING_WARMUP:
                times[name].append(time.perf_counter() - tic)
            rollback_cache(cache, position)
    median = {name: statistics.median(t) for name, t in times.items()}
    decode = median["decode"]
    draft = max(0.0, sum(median[f"round {k}"] - median[f"verify {k}"] for k in ks) / sum(ks))
    return dict(
        decode_ms=decode * 1e3,
        draft_step_ms=draft * 1e3,
        isolated_draft_step_ms=median["draft"] * 1e3,
        verify_ms={str(k): median[f"verify {k}"] * 1e3 for k in ks},
        round_ms={str(k): median[f"round {k}"] * 1e3 for k in ks},
        c=draft / decode,
        v={str(k): median[f"verify {k}"] / decode for k in ks},
    )


def machine_info() -> dict:
    return dict(
        platform=platform.platform(),
        processor=_processor(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        mlx=mx.__version__,
        mlx_lm=mlx_lm.__version__,
        device=str(mx.default_device()),
        blas=blas_info(),
        ranks=distributed.world().size(),  # > 1: tensor-parallel under mlx.launch
    )


def _processor() -> str:
    name = platform.processor()
    if name and name not in ("x86_64", "arm", "i386"):
        return name
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine()


def blas_info() -> dict:
    """Which BLAS MLX's CPU backend uses: on Linux, OpenBLAS if it is loaded into this
    process (normally by LD_PRELOAD), else MLX's bundled reference BLAS."""
    preload = os.environ.get("LD_PRELOAD", "")
    if sys.platform == "darwin":
        return dict(name="Accelerate", library=None, ld_preload=preload or None)
    try:
        with open("/proc/self/maps") as f:
            loaded = sorted({line.split()[-1] for line in f if "libopenblas" in line})
    except OSError:
        loaded = []
    if loaded:
        how = "LD_PRELOAD" if "openblas" in preload else "linked"
        return dict(name=f"OpenBLAS ({how})", library=loaded[0], ld_preload=preload or None)
    return dict(name="MLX bundled reference BLAS (no OpenBLAS loaded)", library=None, ld_preload=preload or None)


def command_line() -> str:
    program = Path(sys.argv[0]).name
    words = ["gemma-mtp" if program in ("__main__.py", "gemma-mtp") else program] + sys.argv[1:]
    preload = os.environ.get("LD_PRELOAD")
    return (f"LD_PRELOAD={shlex.quote(preload)} " if preload else "") + " ".join(map(shlex.quote, words))


def describe_model(module, args, model_type: str, name: Optional[str]) -> dict:
    """`args`: the model's gemma4_text ModelArgs."""
    params = tree_flatten(module.parameters())
    return dict(
        name=name,
        model_type=model_type,
        layers=args.num_hidden_layers,
        hidden_size=args.hidden_size,
        parameters=sum(v.size for _, v in params),
        dtypes=sorted({str(v.dtype).replace("mlx.core.", "") for _, v in params}),
    )


def best_k(result: dict, temp: float = 0.0) -> dict:
    """The speculative configuration with the highest tokens/s at `temp`."""
    candidates = [r for r in result["configs"] if r["kind"] == "speculative" and r["temp"] == temp]
    if not candidates:
        measured = sorted({r["temp"] for r in result["configs"]})
        raise ValueError(f"no speculative run at temp {temp:g}; measured temps: {measured}")
    return max(candidates, key=lambda r: r["tokens_per_s"])


def tune(model, tokenizer, draft_model, prompts, *, temp: float = 0.0, **options) -> Tuple[int, dict]:
    """Benchmark at one temperature and return (the fastest k, the benchmark result).

    `options` are `run_benchmark`'s (ks, max_tokens, repeats, seed, ...).
    """
    result = run_benchmark(model, tokenizer, draft_model, prompts, temps=(temp,), **options)
    return best_k(result, temp)["k"], result


def describe_best(best: dict) -> str:
    verdict = "" if best["ratio"] > 1 else "; speculation does not pay here, decode without the drafter"
    return (f"best k at temp {best['temp']:g}: {best['k']} ({best['tokens_per_s']:.1f} tokens/s, "
            f"{best['ratio']:.2f}x plain decoding){verdict}")


def describe_auto(r: dict) -> str:
    """The share of `auto`'s rounds that drafted each k."""
    total = sum(r["rounds_by_k"])
    shares = ", ".join(f"k={k} {n / total:.0%}" for k, n in enumerate(r["rounds_by_k"]) if n)
    return f"\n{r['name']}: rounds by k: {shares}"


def _number(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict) -> str:
    lines = [
        "| config | tokens/s | ratio | mean accepted length | acceptance by position | predicted speedup "
        "| measured/predicted | efficiency | mask ms/token |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["configs"]:
        by_position = " ".join(f"{a:.2f}" for a in r["acceptance_by_position"] or []) or "-"
        lines.append(
            f"| {r['name']} | {r['tokens_per_s']:.1f} | {_number(r['ratio'])} | {_number(r['mean_accepted_length'])} "
            f"| {by_position} | {_number(r['predicted_speedup'])} | {_number(r['measured_over_predicted'])} "
            f"| {_number(r['efficiency'])} | {_number(r.get('mask_ms_per_token'))} |"
        )
    return "\n".join(lines)


def _describe(model: dict) -> str:
    return (f"{model['name'] or '(unnamed)'}: {model['model_type']}, {model['layers']} layers, "
            f"hidden {model['hidden_size']}, {model['parameters'] / 1e6:.2f}M stored parameters "
            f"({', '.join(model['dtypes'])})")


def markdown_report(result: dict) -> str:
    m, s, costs = result["machine"], result["settings"], result["costs"]
    verify = ", ".join(f"k={k} {v:.2f}" for k, v in costs["v"].items())
    lines = [
        "# gemma-mtp bench",
        "",
        f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs; "
        f"mlx {m['mlx']} on {m['device']}, mlx-lm {m['mlx_lm']}",
        f"- BLAS: {m['blas']['name']}" + (f" `{m['blas']['library']}`" if m["blas"]["library"] else ""),
        f"- ranks: {m['ranks']}" + (" (tensor-parallel over mlx.distributed; parameters and peak memory are "
                                    "rank 0's)" if m["ranks"] > 1 else ""),
        f"- model: {_describe(result['model'])}",
        f"- drafter: {_describe(result['draft_model'])}",
        f"- command: `{result['command']}`",
        f"- {s['prompts']} prompts ({', '.join(map(str, s['prompt_tokens']))} tokens), max tokens {s['max_tokens']}, "
        f"{s['repeats']} interleaved repeats (median), seed {s['seed']}",
        f"- step costs: target decode {costs['decode_ms']:.2f} ms, drafter step in a round "
        f"{costs['draft_step_ms']:.2f} ms (c = {costs['c']:.3f}; timed alone {costs['isolated_draft_step_ms']:.2f} ms); "
        f"verify k+1 tokens relative to one decode, v(k): {verify}",
        f"- exactness: {_describe_exactness(result['exactness'])}",
        "",
        "ratio: tokens/s over plain decoding (our API) at the same temp. predicted speedup: mean accepted "
        "length / (v(k) + k c). efficiency: ratio / mean accepted length (1 would be free drafts and a free "
        "verify). A=...: planted acceptance, each draft replaced by the target's own greedy token with "
        "probability A after the drafter ran. Absolute tokens/s compare only on the same machine.",
        "",
        markdown_table(result),
    ]
    lines += [describe_auto(r) for r in result["configs"] if r["kind"] == "auto"]
    if result.get("best"):
        lines += ["", describe_best(result["best"])]
    return "\n".join(lines) + "\n"


def _describe_exactness(check: dict) -> str:
    verdict = "exact" if check["ok"] else "NOT EXACT (see `gemma-mtp doctor`)"
    planted_runs = check.get("planted")
    with_planted = (f", with planted drafts on {planted_runs['identical']}/{planted_runs['runs']} runs"
                    if planted_runs else "")
    return (f"greedy speculative output == plain output on {check['identical']}/{check['prompts']} prompts "
            f"(k={check['k']}){with_planted}; largest |verify logits - one-by-one decode logits| "
            f"{check['max_logit_gap']:.3g}; {verdict}")


def write_reports(result: dict, out_dir) -> Tuple[Path, Path]:
    """Write `bench.json` (everything) and `bench.md` (the table) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench.json", out / "bench.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown_report(result))
    return json_path, md_path


def _int_list(text: str) -> Tuple[int, ...]:
    """Draft lengths: integers, and `auto` for the adaptive controller."""
    try:
        return tuple(x if x == AUTO else int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or auto, such as 1,2,4,auto, got {text!r}")


def _float_list(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,0.7, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_options(parser, no_draft=False)
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="one prompt per line, each wrapped in the chat template when the tokenizer has "
                             "one; in a .jsonl file each line is a JSON string; unset: the default model's "
                             f"held-out code prompts, else {len(DEFAULT_PROMPTS)} built-in prompts")
    parser.add_argument("--ks", type=_int_list, default=",".join(map(str, DEFAULT_KS)),
                        help="draft lengths to measure, comma-separated; auto: the adaptive k "
                             "(num_draft_tokens=\"auto\")")
    parser.add_argument("--temps", type=_float_list, default=",".join(map(str, DEFAULT_TEMPS)),
                        help="temperatures to measure, comma-separated; 0 is greedy")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="most tokens generated per prompt and run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats; tokens/s is their median")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the sampled runs")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="directory for bench.json and bench.md")
    parser.add_argument("--planted-acceptance", type=_float_list, default=(), metavar="A,A,...",
                        help="also measure, at each fixed k, rounds whose drafts (after the drafter ran) are "
                             "replaced by the target's own greedy tokens with probability A per position: "
                             "acceptance as a dial, output unchanged; greedy only (--temps 0)")
    add_format_options(parser)  # constrained rows beside the unconstrained ones
    parser.add_argument("--auto", action="store_true",
                        help="also pick and print the k with the highest tokens/s at the first --temps value")
    parser.add_argument("--shapes", nargs="?", const="published", default=None, choices=sorted(shapes.SHAPE_SETS),
                        help="instead: time random-weight drafters and target layers at the published pairs' shapes "
                             "(float32, bfloat16, 4-bit) and write shapes.json / shapes.md; 'small' is a quick "
                             "stand-in; alone: published")
    parser.add_argument("--profile", action="store_true",
                        help="instead: split each speculative round's time into host graph building, queueing and "
                             "waiting, for each --ks value at the first --temps value")
    parser.add_argument("--batch-sizes", type=_int_list, default=None, metavar="B,B,...",
                        help="instead: aggregate tokens/s of batched greedy decoding at these batch sizes "
                             "(mlx-lm's BatchGenerator, ours without and with the drafter per --ks); "
                             "writes batch.json")


def run_profile(args: argparse.Namespace, model, tokenizer, drafter, prompts) -> None:
    """`bench --profile`: per-round timelines (timeline.py), plain decoding first."""
    target = as_target(model)
    profiles = [timeline.profile_rounds(target, tokenizer, drafter, prompts, k=k, temp=args.temps[0],
                                        max_tokens=args.max_tokens) for k in (0, *args.ks)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(dict(machine=machine_info(), command=command_line(),
                                                      profiles=profiles), indent=1) + "\n")
    print(timeline.markdown_table(profiles))
    print(f"wrote {out / 'profile.json'} (per-round medians in ms; k=0 is plain decoding)")


def run_shapes(args: argparse.Namespace) -> None:
    """`bench --shapes`: the real-shape cost table (shapes.py). It times layers at fixed
    widths: `auto` (a choice among them each round) has no column of its own."""
    ks = [k for k in args.ks if k != AUTO]
    if not ks:
        raise ValueError(f"--shapes times fixed draft lengths: give at least one number in --ks (not only {AUTO})")
    result = shapes.run_shapes(args.shapes, ks=ks, progress=lambda line: print(line, file=sys.stderr, flush=True))
    result.update(machine=machine_info(), command=command_line())
    json_path, md_path = shapes.write_reports(result, args.out)
    print(shapes.markdown_table(result))
    print(f"wrote {json_path} and {md_path}")


def read_prompts(path) -> List[str]:
    """Prompts from a file: one per line, or one JSON string per line in a .jsonl file."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines()]
    prompts = [line for line in lines if line]
    if path.suffix == ".jsonl":
        try:
            prompts = [json.loads(line) for line in prompts]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno} is not JSON; a .jsonl file holds one JSON string per line")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: every line must be a JSON string")
    if not prompts:
        raise ValueError(f"{path} holds no prompts: write one prompt per line")
    return prompts


def run(args: argparse.Namespace) -> None:
    """Benchmark as `args` say, write the reports, print the table (and the best k with --auto)."""
    if args.shapes and args.profile:
        raise ValueError("--shapes and --profile are separate measurements: give one of them")
    if args.planted_acceptance and (args.shapes or args.profile or args.batch_sizes):
        raise ValueError("--planted-acceptance adds rows to the benchmark's table: run it without --shapes, "
                         "--profile and --batch-sizes")
    if args.planted_acceptance:
        planted.check_greedy(args.temps)  # before loading anything
    if distributed.world().size() > 1 and (args.shapes or args.profile or args.batch_sizes):
        raise ValueError("--shapes, --profile and --batch-sizes measure one process: run them without "
                         "mlx.launch (under it, bench measures the split pair's plain and speculative decoding)")
    if args.shapes:
        return run_shapes(args)
    if args.prompts:
        texts = read_prompts(args.prompts)
    else:
        texts = read_prompts(DEFAULT_PROMPTS_FILE) if args.model is None else DEFAULT_PROMPTS
    distributed.refuse_adaptive_k(args.ks, "--ks")
    model, tokenizer, drafter = distributed.load_pair(args.model, args.draft_model)
    if drafter is None:
        raise ValueError(f"{args.model} has no drafter: pass --draft-model (its gemma4_assistant checkpoint)")
    if args.profile:
        return run_profile(args, model, tokenizer, drafter, [chat_prompt(tokenizer, t) for t in texts])
    blas = blas_info()
    if sys.platform == "linux" and mx.default_device() == mx.cpu and "OpenBLAS" not in blas["name"]:
        print("gemma-mtp bench: MLX's CPU backend is using its reference BLAS, which makes every verify cost "
              "(k+1)x a decode step; see bench/README.md for the OpenBLAS LD_PRELOAD", file=sys.stderr)
    if args.batch_sizes:
        _run_batched(args, model, tokenizer, drafter, texts)
        return
    result = run_benchmark(
        model, tokenizer, drafter, [chat_prompt(tokenizer, t) for t in texts],
        ks=args.ks, temps=args.temps, max_tokens=args.max_tokens, repeats=args.repeats, seed=args.seed,
        model_name=args.model or f"(default) {DEFAULT_MODEL.name}",
        draft_model_name=args.draft_model or "(the pair's drafter)",
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        planted_acceptance=args.planted_acceptance,
        response_format=response_format(args),
    )
    if args.auto:
        result["best"] = best_k(result, args.temps[0])
    if not distributed.is_rank_zero():  # every rank measured (the model work is collective); rank 0 reports
        return
    json_path, md_path = write_reports(result, args.out)
    print(markdown_table(result))
    print(f"wrote {json_path} and {md_path}")
    if args.auto:
        print(describe_best(result["best"]))


def _run_batched(args, model, tokenizer, drafter, texts) -> None:
    from .batch import batch_markdown_table, run_batch_benchmark

    target = as_target(model)
    prompts = [encode_prompt(tokenizer, chat_prompt(tokenizer, t)).tolist() for t in texts]
    result = run_batch_benchmark(target, tokenizer, drafter, prompts, batch_sizes=args.batch_sizes, ks=args.ks,
                                 max_tokens=args.max_tokens, repeats=args.repeats,
                                 progress=lambda line: print(line, file=sys.stderr, flush=True))
    result.update(machine=machine_info(), command=command_line())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps(result, indent=2))
    print(batch_markdown_table(result))
    print(f"wrote {out / 'batch.json'}")
