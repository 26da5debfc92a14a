"""Load benchmark of the reward server against in-process scoring of the same texts.

`python bench/serve.py --checkpoint <run or exported dir> --data FILE --clients 16`

Starts `python -m rmexp.serve` on a free port, sends the answers of the file's first pairs (chosen
and rejected, with their prompts) from N concurrent clients, `--per-request` texts a request, and
measures requests/s, texts/s and p50/p99 latency; then scores the same texts in this process with
`RewardModel.score_batch` in groups of `serve.max_batch`, then sends `--soak` requests in a row,
reading the server's RSS before and after, and finally one `/get_reward` query led by `--pads` pad
tokens (OpenRLHF's left padding, 2.2 MB at 320,000) while another client polls `/health`: the
request's seconds and the slowest `/health` answer during it (a request must not stall the server).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, max_batch: int, log_dir: str):
    import httpx

    port = free_port()
    log = open(Path(log_dir) / "server.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen([sys.executable, "-m", "rmexp.serve", f"checkpoint={checkpoint}", f"serve.port={port}",
                             f"serve.max_batch={max_batch}", f"hydra.run.dir={log_dir}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{(Path(log_dir) / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def padded_query(url: str, pads: int, pad_token: str) -> tuple[float, float]:
    """Seconds of one /get_reward query led by `pads` pad tokens, and the slowest /health answer
    while it ran (polled from a second client)."""
    import httpx

    prompt = "Say hello."
    body = json.dumps({"query": [pad_token * pads + prompt + " Hello!"], "prompts": [prompt]}).encode()
    slowest, done = [0.0], threading.Event()

    def poll():
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                started = time.perf_counter()
                client.get(f"{url}/health")
                slowest[0] = max(slowest[0], time.perf_counter() - started)
                time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.1)
    started = time.perf_counter()
    with httpx.Client(timeout=600) as client:
        answer = client.post(f"{url}/get_reward", content=body, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - started
    done.set()
    poller.join()
    if answer.status_code != 200:
        sys.exit(f"the padded query failed: {answer.status_code} {answer.text[:300]}")
    return elapsed, slowest[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a training run dir or an exported model dir")
    parser.add_argument("--data", required=True, help="a pairs file (its prompts and answers are the texts)")
    parser.add_argument("--pairs", type=int, default=256, help="pairs to take: 2 texts each")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-request", type=int, default=4, help="texts in one request")
    parser.add_argument("--max-batch", type=int, default=64, help="serve.max_batch")
    parser.add_argument("--soak", type=int, default=1000, help="requests in a row at the end (RSS before and after)")
    parser.add_argument("--pads", type=int, default=320_000, help="pad tokens leading the last /get_reward query")
    args = parser.parse_args()

    import httpx

    from rmexp.dataset import read_pairs

    pairs, _ = read_pairs(args.data, max_pairs=args.pairs, on_error="skip")
    items = [(p.prompt, answer) for p in pairs for answer in (p.chosen, p.rejected)]
    requests = [items[i:i + args.per_request] for i in range(0, len(items), args.per_request)]
    log_dir = tempfile.mkdtemp(prefix="rmexp-bench-serve-")
    proc, url = start_server(args.checkpoint, args.max_batch, log_dir)
    try:
        local = threading.local()  # one HTTP client (connection) per client thread

        def send(request):
            client = getattr(local, "client", None) or httpx.Client(timeout=600)
            local.client = client
            started = time.perf_counter()
            try:
                answer = client.post(f"{url}/score", json={"prompts": [q for q, _ in request],
                                                           "completions": [a for _, a in request]})
                ok = answer.status_code == 200 and len(answer.json()["rewards"]) == len(request)
            except httpx.HTTPError:
                ok = False
            return ok, time.perf_counter() - started

        send(requests[0])  # warm-up: first forward, lazy initialisation
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(send, requests))
        server_s = time.perf_counter() - started
        latencies = [s for _, s in results]
        failed = sum(not ok for ok, _ in results)

        from rmexp.reward_model import RewardModel

        rm = RewardModel.load(args.checkpoint)
        rm.score_batch(items[:args.per_request])  # the same warm-up
        started = time.perf_counter()
        for i in range(0, len(items), args.max_batch):
            rm.score_batch(items[i:i + args.max_batch])
        local_s = time.perf_counter() - started
        del rm

        short = {"prompts": ["Say hello."], "completions": ["Hello!"]}
        with httpx.Client(timeout=600) as client:
            rss_before = rss_mb(proc.pid)
            soak_failed = sum(client.post(f"{url}/score", json=short).status_code != 200 for _ in range(args.soak))
            rss_after = rss_mb(proc.pid)
            health = client.get(f"{url}/health").json()
        from transformers import AutoTokenizer

        pad_s, health_max_s = padded_query(url, args.pads, AutoTokenizer.from_pretrained(args.checkpoint).pad_token)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    n = len(items)
    summary = {
        "checkpoint": args.checkpoint, "clients": args.clients, "texts": n, "requests": len(requests),
        "per_request": args.per_request, "max_batch": args.max_batch,
        "server_requests_per_s": round(len(requests) / server_s, 3), "server_texts_per_s": round(n / server_s, 3),
        "inprocess_texts_per_s": round(n / local_s, 3), "server_over_inprocess": round(local_s / server_s, 3),
        "p50_latency_s": round(percentile(latencies, 0.5), 3), "p99_latency_s": round(percentile(latencies, 0.99), 3),
        "failed_requests": failed, "soak_requests": args.soak, "soak_failed": soak_failed,
        "server_rss_before_soak_mb": round(rss_before, 1), "server_rss_after_soak_mb": round(rss_after, 1),
        "server_texts_truncated": health.get("texts_truncated"),
        "pad_query_pads": args.pads, "pad_query_s": round(pad_s, 3), "health_max_ms_during_pad_query": round(health_max_s * 1000, 1),
    }
    print(f"| path | texts/s | requests/s | p50 s | p99 s | failed |\n| --- | --- | --- | --- | --- | --- |\n"
          f"| server, {args.clients} clients x {args.per_request} texts | {summary['server_texts_per_s']:.2f} | "
          f"{summary['server_requests_per_s']:.2f} | {summary['p50_latency_s']:.2f} | {summary['p99_latency_s']:.2f} | "
          f"{failed} |\n| in-process score_batch ({args.max_batch} a call) | {summary['inprocess_texts_per_s']:.2f} | | | | |")
    print(f"server at {summary['server_over_inprocess']:.0%} of in-process; {args.soak} requests in a row: "
          f"{soak_failed} failed, server RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    print(f"a query led by {args.pads:,} pads: {pad_s:.3f} s; /health answered within {health_max_s * 1000:.1f} ms meanwhile")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
