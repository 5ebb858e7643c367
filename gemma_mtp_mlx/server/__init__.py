"""`gemma-mtp serve`: an OpenAI-compatible HTTP server with exact MTP speculative decoding.

`app.py` is the HTTP layer, `worker.py` the generation thread that owns the model and
drives the batch engine (`gemma_mtp_mlx.batch.BatchEngine`: requests join the running
batch at the next round), `prompt_cache.py` the LRU of K/V caches keyed by token prefix,
`lockstep.py` the same server under `mlx.launch` (rank 0 serves, the other ranks follow).
"""

import argparse

from ..arguments import add_pair_options, draft_tokens

DEFAULT_PROMPT_CACHE_BYTES = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("--num-draft-tokens", type=draft_tokens, default=None,
                        help="tokens drafted per round unless a request says, or auto: chosen each round "
                             "from the acceptance and round times measured so far; unset: the drafter's "
                             "num_assistant_tokens, else 4")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="most requests generating at once; more wait for a free row")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per reply when a request does not say")
    parser.add_argument("--prompt-cache-size", type=int, default=10,
                        help="most K/V caches kept for reuse by later prompts with the same start; 0 disables")
    parser.add_argument("--prompt-cache-bytes", type=int, default=DEFAULT_PROMPT_CACHE_BYTES,
                        help="most bytes the kept caches may hold")


def run(args) -> None:
    from .app import serve  # FastAPI and uvicorn load only for this command

    serve(args)
