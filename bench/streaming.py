"""Benchmark 4: x̂₀ previews over Server-Sent Events — time to the first preview, and their cost.

    .venv/bin/python -m bench.streaming [--model PATH | --arch bundled] [--steps 50] [--sampler ddim]
        [--repeat 5] [--concurrency 16] [--duration 30] [--threads 1]

Time to first preview: on an idle `ddpm-serve`, POST /sample (n = 1, stream_every 1), then GET
/stream/{id} until the first `progress` event; the median over --repeat jobs, beside the median time of
one engine step (the whole job's time over its steps) — the part of the wait that is the step itself.
Cost: closed-loop clients at --concurrency each POST a job and read its stream to `done`, with
stream_every 1 (a preview every step) and 0 (none); `ratio` is the throughput with previews over
without. Writes bench/results/streaming.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
import torch

from bench.common import save, set_threads, table
from bench.models import ARCHS, model_folder
from bench.server import serve
from bench.serving import Load, count_window


async def stream_job(client: httpx.AsyncClient, body: dict) -> tuple[float, float | None, float]:
    """(sent, first preview, done) perf_counter times of one job read over SSE."""
    sent = time.perf_counter()
    job = (await client.post("/sample", json=body)).raise_for_status().json()
    first: float | None = None
    event = None
    async with client.stream("GET", f"/stream/{job['id']}") as response:
        if response.status_code != 200:
            raise RuntimeError(f"GET /stream: {response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event == "progress" and first is None:
                if json.loads(line.partition(":")[2]).get("x0"):
                    first = time.perf_counter()
            elif line.startswith("data:") and event in ("done", "error"):
                if event == "error":
                    raise RuntimeError(f"job {job['id']} failed: {line}")
                break
    return sent, first, time.perf_counter()


async def first_previews(url: str, body: dict, repeat: int) -> list[tuple[float, float | None, float]]:
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        return [await stream_job(client, {**body, "seed": k}) for k in range(repeat)]


async def streamed_load(
    url: str, body: dict, *, concurrency: int, duration: float, max_requests: int
) -> Load:
    """Closed loop of jobs read to the end over their streams."""
    issued = 0
    done: list[tuple[float, float]] = []
    limits = httpx.Limits(max_connections=2 * concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal issued
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                sent, _, end = await stream_job(client, {**body, "seed": issued})
                done.append((end, end - sent))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count_window(done, start, deadline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (diffusers layout); default: --arch")
    parser.add_argument("--arch", default="bundled", choices=ARCHS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"))
    parser.add_argument("--repeat", type=int, default=5, help="jobs timed for the first preview")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch intra-op threads in the server")
    args = parser.parse_args()
    set_threads(args.threads)
    folder, described = model_folder(args.model, args.arch)
    print(
        f"model: {described}; {args.device}, {args.sampler}-{args.steps}, threads {args.threads or 'default'}"
    )
    body = {"n": 1, "steps": args.steps, "sampler": args.sampler}
    rows: list[dict[str, object]] = []
    limits = dict(max_queued_jobs=4 * args.concurrency + 64, max_streams_per_key=args.concurrency + 8)
    with serve(folder, device=args.device, threads=args.threads, **limits) as url:
        asyncio.run(first_previews(url, {**body, "stream_every": 1}, 2))  # warm-up
        jobs = asyncio.run(first_previews(url, {**body, "stream_every": 1}, args.repeat))
        ttfp = statistics.median(first - sent for sent, first, _ in jobs if first is not None)
        step = statistics.median((end - sent) / args.steps for sent, _, end in jobs)
        rows.append(
            {
                "measure": "first preview, idle server",
                "stream_every": 1,
                "seconds": round(ttfp, 4),
                "step_s": round(step, 4),
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)
        rates = {}
        for every in (0, 1):
            load = asyncio.run(
                streamed_load(
                    url,
                    {**body, "stream_every": every},
                    concurrency=args.concurrency,
                    duration=args.duration,
                    max_requests=args.max_requests,
                )
            )
            row = load.row(measure=f"closed loop c={args.concurrency}", stream_every=every)
            rates[every] = row["images_s"]
            rows.append(row)
            print(table(rows[-1:], list(row)), flush=True)
        rows[-1]["ratio"] = round(rates[1] / rates[0], 3) if rates[0] else ""
    print()
    columns = [
        "measure",
        "stream_every",
        "seconds",
        "step_s",
        "requests",
        "images_s",
        "p50_s",
        "p95_s",
        "ratio",
    ]
    print(table(rows, columns))
    print(f"wrote {save('streaming', rows, model=described, device=args.device, steps=args.steps)}")


if __name__ == "__main__":
    main()
