"""How fast an overloaded server says no: a burst of streaming chat requests past
--max-concurrent-requests (default 128), against a server on 127.0.0.1 that this script starts.

    python bench/overload.py                 # 300 requests at once, 64 tokens each
    python bench/overload.py --requests 500 --max-tokens 32

Prints how many were answered 200 and 429, the burst's 429 latency (p50 / p99 / max, from sending
the request to the status line) and whether each carried Retry-After; then the latency of up to
`--probes` single requests that a SEPARATE process sends one after another while the admitted
streams run. The burst's own figures include its client's backlog (one asyncio loop opening 300
connections and reading the admitted streams); the probes measure the server alone. Bounded: one
burst, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from run import free_port, wait_healthy  # noqa: E402  (bench/run.py)

BODY = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 64, "stream": True}


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    return f"p50 {statistics.median(values) * 1000:.1f}, p99 {p99 * 1000:.1f}, max {values[-1] * 1000:.1f}"


def probe(base: str, count: int) -> None:
    """Runs in its own process: `count` requests one after another, 50 ms apart; prints JSON."""
    latencies, statuses, retry_after = [], [], []
    with httpx.Client(base_url=base, timeout=60) as http:
        for _ in range(count):
            sent = time.perf_counter()
            r = http.post("/v1/chat/completions", json={**BODY, "stream": False})
            latencies.append(time.perf_counter() - sent)
            statuses.append(r.status_code)
            retry_after.append(r.headers.get("retry-after"))
            time.sleep(0.05)
    print(json.dumps({"latencies": latencies, "statuses": statuses, "retry_after": retry_after}))


async def one_raw(host: str, port: int, payload: bytes, go: asyncio.Event) -> tuple[int, float, str | None, int, float]:
    """One request over a raw socket: connected first, sent when `go` is set, timed to the status
    line. A raw client costs microseconds per request, so 300 of them measure the server, not the
    client (httpx's async client spent ~1.5 ms of CPU on each, which queued the burst's last ones)."""
    reader, writer = await asyncio.open_connection(host, port)
    await go.wait()
    sent = time.perf_counter()
    writer.write(payload)
    status_line = await reader.readline()
    latency = time.perf_counter() - sent
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    retry_after = re.search(r"^retry-after: *(\S+)", head, re.M)
    chunks = 0
    while data := await reader.read(65536):  # Connection: close; the stream runs to its end
        chunks += data.count(b'"content":"')  # one per streamed token, near enough
    writer.close()
    return int(status_line.split()[1]), latency, retry_after.group(1) if retry_after else None, chunks, time.perf_counter()


async def burst(base: str, requests: int, max_tokens: int, probes: int) -> None:
    host, port = base.removeprefix("http://").split(":")
    # min_tokens: every admitted stream holds its slot to the end, so the probes meet a full server
    body = json.dumps({**BODY, "max_tokens": max_tokens, "min_tokens": max_tokens}).encode()
    payload = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    go = asyncio.Event()
    tasks = [asyncio.create_task(one_raw(host, int(port), payload, go)) for _ in range(requests)]
    await asyncio.sleep(1.0)  # every connection open
    go.set()
    started = time.perf_counter()
    await asyncio.sleep(2.0)  # the burst is in and the engine saturated
    prober = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--probe", base, "--probes", str(probes), stdout=asyncio.subprocess.PIPE)
    out, _ = await prober.communicate()
    results = await asyncio.gather(*tasks)
    elapsed = max(r[4] for r in results) - started  # until the last admitted stream ended
    refused = [r[1] for r in results if r[0] == 429]
    print(f"{requests} requests at once: {sum(r[0] == 200 for r in results)} answered 200, {len(refused)} 429, "
          f"{sum(r[0] not in (200, 429) for r in results)} other; the admitted streams got "
          f"{sum(r[3] for r in results) / elapsed:.1f} tok/s in all")
    if refused:
        with_header = sum(1 for r in results if r[0] == 429 and r[2])
        print(f"burst 429 latency ms: {percentiles(refused)}; Retry-After on {with_header} of {len(refused)}")
    probed = json.loads(out)
    refused = [lat for lat, s in zip(probed["latencies"], probed["statuses"]) if s == 429]
    print(f"then, from another process while the admitted streams ran: {len(refused)} of {probes} probes 429, "
          f"in ms {percentiles(refused) if refused else '-'}; Retry-After values "
          f"{sorted(set(h for h, s in zip(probed['retry_after'], probed['statuses']) if s == 429))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--probe", metavar="BASE", help=argparse.SUPPRESS)  # the probing child process
    parser.add_argument("--server-arg", action="append", default=[], help="extra `parley serve` argument")
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe, args.probes)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "parley", "serve", "--port", str(port), *args.server_arg],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        asyncio.run(burst(base, args.requests, args.max_tokens, args.probes))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
