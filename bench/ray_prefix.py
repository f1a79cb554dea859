"""Parley on Ray Serve, on a local Ray instance this script starts (and stops): the prefix-aware
router against Ray's default, 1 replica against 2, and how long a killed replica takes to answer again.

    python bench/ray_prefix.py --mode prefix      # prefix router vs power_of_two: prefix-cache hits, tok/s
    python bench/ray_prefix.py --mode replicas    # 1 replica (2 threads) vs 2 (1 thread each): aggregate tok/s
    python bench/ray_prefix.py --mode restart     # a replica killed: seconds until its successor answers
    python bench/ray_prefix.py --mode all --model-id /path/to/model

The workload: `--requests` chat requests, `--concurrency` at a time, each a system prompt (one of
`--systems`, ~1,000 characters each) and a question of its own, `--max-tokens` generated. Each
replica's KV cache (`--kv-tokens`) holds only some of the system prompts, so a replica that sees
every one of them evicts and recomputes them. The hit rate is the replicas'
parley_prefix_cache_hit_tokens_total over parley_prefix_cache_queried_tokens_total, summed.
Default model: the bundled SmolLM2-135M-Instruct; the Ray instance gets 2 CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from run import free_port, wait_healthy  # noqa: E402  (bench/run.py)

TOPICS = ["a bakery's online orders", "a city's bus timetable", "a hospital's visiting hours", "a library's loans",
          "a bank's card services", "a hotel's reservations", "a school's enrolment office", "a garden centre",
          "an airline's baggage desk", "a museum's ticket office", "a bicycle repair shop", "a tax office",
          "a cinema's box office", "a vet's appointments", "a ferry company's crossings", "a phone shop"]


def system_prompt(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    rules = " ".join(f"Rule {n}: when asked about {topic}, answer in at most two sentences, be polite, "
                     f"and never invent a price or a date (variant {i})." for n in range(1, 7))
    return f"You are the assistant of {topic}. {rules}"


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


async def workload(url: str, args) -> dict:
    rng = random.Random(0)
    jobs = [(rng.randrange(args.systems), i) for i in range(args.requests)]
    replicas: set[str] = set()
    generated, failures = 0, 0
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def worker() -> None:
            nonlocal generated, failures
            while not queue.empty():
                system, i = queue.get_nowait()
                body = {"messages": [{"role": "system", "content": system_prompt(system)},
                                     {"role": "user", "content": f"Question {i}: what should I bring?"}],
                        "max_tokens": args.max_tokens, "min_tokens": args.max_tokens, "temperature": 0}
                response = await http.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    failures += 1
                    continue
                replicas.add(response.headers["x-parley-replica"])
                generated += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
        hits = queried = 0.0
        for replica in replicas:
            text = (await http.get("/metrics", headers={"x-parley-replica": replica})).text
            hits += metric_sum(text, "parley_prefix_cache_hit_tokens_total")
            queried += metric_sum(text, "parley_prefix_cache_queried_tokens_total")
    return {"seconds": elapsed, "tok_s": generated / elapsed, "req_s": (len(jobs) - failures) / elapsed,
            "hit_rate": hits / queried if queried else 0.0, "failures": failures, "replicas": len(replicas)}


def deploy(model_args: dict, **ray_args) -> None:
    """A fresh application: the one before is deleted first (Ray's rolling update would start the new
    replicas before stopping the old, and the 2 CPUs do not hold both)."""
    from ray import serve

    from parley.deploy.ray import build

    serve.delete("parley")
    serve.run(build({**model_args, **ray_args}), name="parley", route_prefix="/")


def report(label: str, result: dict) -> None:
    print(f"{label:<28} {result['tok_s']:7.1f} tok/s  {result['req_s']:5.2f} req/s  prefix-cache hits "
          f"{result['hit_rate'] * 100:5.1f}%  ({result['replicas']} replicas answered, {result['failures']} failed)",
          flush=True)


def restart_time(url: str) -> float:
    """Seconds from killing a replica to the first answer of the replica Ray starts in its place."""
    import ray

    seen: set[str] = set()
    while len(seen) < 2:
        seen.add(httpx.get(url + "/health", timeout=60).headers["x-parley-replica"])
    victim = sorted(seen)[0]
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
    ray.kill(ray.get_actor(name, namespace="serve"))
    killed = time.perf_counter()
    deadline = killed + 600
    while time.perf_counter() < deadline:
        try:
            response = httpx.get(url + "/health", timeout=60)
        except httpx.TransportError:
            continue
        if response.status_code == 200 and response.headers["x-parley-replica"] not in seen:
            return time.perf_counter() - killed
        time.sleep(0.05)
    raise SystemExit("no new replica answered within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("prefix", "replicas", "restart", "all"), default="prefix")
    parser.add_argument("--model-id", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--systems", type=int, default=8, help="distinct system prompts")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-tokens", type=int, default=2048, help="each replica's KV cache, in tokens")
    args = parser.parse_args()

    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = {"max_batch_total_tokens": args.kv_tokens, "max_total_tokens": min(2048, args.kv_tokens),
             "status_interval": 0, **({"model_id": args.model_id} if args.model_id else {})}
    print(f"load average {os.getloadavg()[0]:.2f}; {args.requests} requests, {args.concurrency} at a time, "
          f"{args.systems} system prompts, {args.max_tokens} tokens each, KV cache {args.kv_tokens} tokens per replica",
          flush=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if args.mode in ("prefix", "all"):
            for router in ("power_of_two", "prefix"):
                deploy(model, num_replicas=2, num_cpus=1, router=router)
                wait_healthy(url, 600)
                report(f"2 replicas, {router} router", asyncio.run(workload(url, args)))
        if args.mode in ("replicas", "all"):
            for replicas in (1, 2):
                deploy(model, num_replicas=replicas, num_cpus=2 / replicas)
                wait_healthy(url, 600)
                report(f"{replicas} replica(s), {2 // replicas} thread(s) each", asyncio.run(workload(url, args)))
        if args.mode in ("restart", "all"):
            deploy(model, num_replicas=2, num_cpus=1)
            wait_healthy(url, 600)
            print(f"a replica killed: its successor answered {restart_time(url):.1f} s later", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
