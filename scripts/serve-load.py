#!/usr/bin/env python3
"""Bounded load test of `kvtuner serve` on localhost: starts the server, runs N concurrent
clients × M streamed chat requests (each client one conversation, so follow-up turns exercise
prefix reuse), stops the server, prints one markdown row.

Measures per request: time to first token (TTFT) and the gaps between streamed chunks
(per-token latency); overall: aggregate generated tokens per second of wall time, failed
requests, and the server's resident memory (RSS) sampled through the run (flat = no growth
between the first and the last request).

With --system-chars N every request starts with one shared system prompt (the first N characters
of --system-file, the Lee corpus by default) and is a fresh conversation (agents resend a long
system prompt and tool list with every request); --no-cache-prompt sends llama-server's
`cache_prompt: false`, the same run without prefix reuse.

usage: serve-load.py --bin target/release/kvtuner -m MODEL [--label L] [--clients 8]
       [--requests 6] [--max-tokens 64] [--stop-at-eos] [--seeds] [--system-chars N]
       [--no-cache-prompt] [-- extra serve flags, e.g. -ctk q8_0 -ctv q8_0]
"""

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

QUESTIONS = [
    "What is the capital of France?",
    "Tell me about the moon.",
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What do cats eat?",
    "How does a bicycle work?",
    "Name three rivers in Europe.",
    "What is the tallest mountain?",
]


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/kvtuner")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="let replies end at the model's end-of-generation token (default: every reply is "
                         "--max-tokens long, so configurations generate the same work)")
    ap.add_argument("--seeds", action="store_true",
                    help="a seed per request (a seeded request decodes its whole prompt: no prefix reuse)")
    ap.add_argument("--slots", type=int, default=0, help="-np (default: one per client)")
    ap.add_argument("--system-chars", type=int, default=0)
    ap.add_argument("--system-file", default=os.path.expanduser("~/.cache/kvtuner/lee_background.cor"))
    ap.add_argument("--no-cache-prompt", action="store_true")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()

    system = open(args.system_file).read()[: args.system_chars] if args.system_chars else None
    cmd = [args.bin, "serve", "-m", args.model, "-c", str(args.ctx), "-np", str(args.slots or args.clients),
           "-t", str(args.threads), "--port", "0", *args.extra]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    addr, log = None, []
    for line in server.stderr:
        log.append(line)
        m = re.search(r"listening on http://(\S+)", line)
        if m:
            addr = m.group(1)
            break
    if addr is None:
        sys.exit("the server did not start:\n" + "".join(log))
    threading.Thread(target=lambda: [log.append(l) for l in server.stderr], daemon=True).start()
    host, port = addr.rsplit(":", 1)

    def get(path):
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        c.request("GET", path)
        return json.loads(c.getresponse().read())

    props = get("/props")
    model = props["model"]

    ttft, gaps, failures, tokens, prompt_tokens = [], [], [], [0], []
    lock = threading.Lock()
    rss = []
    done = threading.Event()

    def sample_rss():
        while not done.is_set():
            rss.append((time.time(), rss_kib(server.pid)))
            time.sleep(0.25)

    def client(i):
        messages = []
        for j in range(args.requests):
            if system is not None:
                messages = [{"role": "system", "content": system}]
            messages.append({"role": "user", "content": QUESTIONS[(i + j) % len(QUESTIONS)]})
            request = {
                "model": model, "messages": messages, "max_tokens": args.max_tokens,
                "temperature": 0.8, "stream": True, "ignore_eos": not args.stop_at_eos,
                "stream_options": {"include_usage": True},
            }
            if args.seeds:
                request["seed"] = 1000 * i + j
            if args.no_cache_prompt:
                request["cache_prompt"] = False
            body = json.dumps(request)
            try:
                c = http.client.HTTPConnection(host, int(port), timeout=300)
                t0 = time.perf_counter()
                c.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
                r = c.getresponse()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
                first, last, text, usage, my_gaps = None, None, "", None, []
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                    if piece:
                        now = time.perf_counter()
                        if first is None:
                            first = now - t0
                        else:
                            my_gaps.append(now - last)
                        last = now
                        text += piece
                if usage is None or first is None:
                    raise RuntimeError("no usage chunk or no text")
                with lock:
                    ttft.append(first)
                    prompt_tokens.append(usage["prompt_tokens"])
                    gaps.extend(my_gaps)
                    tokens[0] += usage["completion_tokens"]
                messages.append({"role": "assistant", "content": text})
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    failures.append(f"client {i} request {j}: {e}")
                messages.pop()

    threading.Thread(target=sample_rss, daemon=True).start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    metrics = http.client.HTTPConnection(host, int(port), timeout=60)
    metrics.request("GET", "/metrics")
    metrics_text = metrics.getresponse().read().decode()
    server.terminate()
    server.wait(timeout=60)

    cached = re.search(r"^kvtuner_prompt_tokens_cached_total (\d+)", metrics_text, re.M)
    copies = re.search(r"^kvtuner_prefix_copies_total (\d+)", metrics_text, re.M)
    prompt = re.search(r"^kvtuner_prompt_tokens_total (\d+)", metrics_text, re.M)
    mem = [k for _, k in rss]
    quarter = max(1, len(mem) // 4)
    early, late = max(mem[:quarter]), max(mem[-quarter:])
    p = props["profile"]
    label = args.label or p["name"]
    print(f"| {label} | {p['bits_per_value']:.2f} | {p['kv_bytes_full_load'] / 1048576:.2f} "
          f"| {args.clients}×{args.requests} | {len(ttft)} | {len(failures)} "
          f"| {percentile(ttft, 50) * 1000:.0f} | {percentile(ttft, 99) * 1000:.0f} "
          f"| {percentile(gaps, 50) * 1000:.1f} | {percentile(gaps, 99) * 1000:.1f} "
          f"| {tokens[0] / wall:.1f} | {wall:.1f} "
          f"| {int(cached.group(1)) if cached else 0}/{int(prompt.group(1)) if prompt else 0} "
          f"| {early / 1024:.0f} → {late / 1024:.0f} |")
    if system is not None:
        print(f"  prompt tokens per request: {min(prompt_tokens)}–{max(prompt_tokens)}; "
              f"prefixes copied between slots: {int(copies.group(1)) if copies else 0}", file=sys.stderr)
    for f in failures:
        print("  failed:", f, file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
