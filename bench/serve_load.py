"""Aggregate tokens/s of `gemma-mtp serve` at several client counts, plain vs speculative.

    python bench/serve_load.py [--clients 1,4,16] [--max-tokens 64] [-- extra serve options]

Starts one server with --no-draft and one with the drafter (the default pair unless the
extra options say --model ...), sends each client count's requests at once (held-out
prompts, greedy, prompt cache off so every prompt is prefilled), alternating between the two
servers, and prints the median completion tokens per second of wall time. Run it through bench/run.sh's OpenBLAS preload on Linux:
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0.
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from gemma_mtp_mlx.loading import DEFAULT_PROMPTS_FILE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(extra):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemma_mtp_mlx", "serve", "--port", str(port),
                             "--prompt-cache-size", "0", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not start")


def complete(url, prompt, max_tokens) -> int:
    body = json.dumps(dict(prompt=prompt, max_tokens=max_tokens, temperature=0)).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]


def aggregate_tps(url, prompts, max_tokens) -> float:
    counts = [0] * len(prompts)

    def run(i):
        counts[i] = complete(url, prompts[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - tic)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, interleaved; the median is shown")
    parser.add_argument("serve_options", nargs="*", help="after --: options for gemma-mtp serve")
    args = parser.parse_args()
    prompts = [json.loads(line) for line in DEFAULT_PROMPTS_FILE.read_text().splitlines()]
    clients = [int(c) for c in args.clients.split(",")]
    servers = {mode: start(args.serve_options + extra) for mode, extra in (("plain", ["--no-draft"]), ("mtp", []))}
    try:
        for _, url in servers.values():
            complete(url, prompts[-1], 8)  # warm up
        print("clients  plain tok/s  mtp tok/s  ratio   (median of interleaved runs)")
        for n in clients:
            runs = {mode: [] for mode in servers}
            for _ in range(args.repeats):
                for mode, (_, url) in servers.items():
                    runs[mode].append(aggregate_tps(url, (prompts * n)[:n], args.max_tokens))
            plain, mtp = (statistics.median(runs[m]) for m in ("plain", "mtp"))
            print(f"{n:>7}  {plain:>11.1f}  {mtp:>9.1f}  {mtp / plain:.2f}x", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
