"""How fast an overloaded server says no: a burst of streaming chat requests past
--max-concurrent-requests (default 128), against a server on 127.0.0.1 that this script starts.

    python bench/overload.py                 # 300 requests at once, 64 tokens each
    python bench/overload.py --requests 500 --max-tokens 32

Prints how many were answered 200 and 429, the 429s' latency (p50 / p99 / max, from sending the
request to the status line) and whether each carried Retry-After; then the latency of up to 50
single requests sent one after another while the admitted streams run. Bounded: one burst, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from run import free_port, wait_healthy  # noqa: E402  (bench/run.py)


async def burst(base: str, requests: int, max_tokens: int) -> None:
    limits = httpx.Limits(max_connections=requests + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": max_tokens,
                "stream": True}

        async def one() -> tuple[int, float, str | None]:
            sent = time.perf_counter()
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                latency = time.perf_counter() - sent
                async for _ in response.aiter_bytes():
                    pass
                return response.status_code, latency, response.headers.get("retry-after")

        tasks = [asyncio.create_task(one()) for _ in range(requests)]
        await asyncio.sleep(0)
        # while the burst's admitted streams run: single requests, one after another
        probes = []
        while len(probes) < 50 and not all(t.done() for t in tasks):
            sent = time.perf_counter()
            r = await http.post("/v1/chat/completions", json={**body, "stream": False})
            if r.status_code == 429:
                probes.append(time.perf_counter() - sent)
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks)
    refused = sorted(latency for status, latency, _ in results if status == 429)
    print(f"{requests} requests at once: {sum(s == 200 for s, _, _ in results)} answered 200, {len(refused)} 429, "
          f"{sum(s not in (200, 429) for s, _, _ in results)} other")
    if refused:
        p99 = refused[min(len(refused) - 1, int(0.99 * len(refused)))]
        with_header = sum(1 for s, _, h in results if s == 429 and h)
        print(f"429 latency ms: p50 {statistics.median(refused) * 1000:.0f}, p99 {p99 * 1000:.0f}, "
              f"max {refused[-1] * 1000:.0f}; Retry-After on {with_header} of {len(refused)}")
    if probes:
        probes.sort()
        print(f"then, one at a time while the admitted streams ran: {len(probes)} 429s in ms p50 "
              f"{statistics.median(probes) * 1000:.0f}, p99 {probes[min(len(probes) - 1, int(0.99 * len(probes)))] * 1000:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "parley", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        asyncio.run(burst(base, args.requests, args.max_tokens))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
