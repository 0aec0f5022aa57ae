"""Benchmark 3: the HTTP service under closed-loop load, per engine policy, against the raw engine.

    .venv/bin/python -m bench.serving [--model PATH | --arch bundled] [--concurrency 1,4,16,64]
        [--policies step,request,serial] [--steps 50] [--sampler ddim] [--duration 30]
        [--max-requests 256] [--threads 1] [--vs-diffusers 16]

For each policy (DDPM_ENGINE_POLICY: step-level batching, request-level batching, one request at a time)
a real `ddpm-serve` child process serves the model; at each concurrency c, c clients each POST /sample
(n = 1, stream_every 0) with ?wait=true and send the next request as soon as the answer comes, for
--duration seconds or --max-requests requests, whichever ends first. Throughput counts the requests
answered inside that window; latencies are theirs (p50, p95). The raw engine row submits the same jobs
straight to an in-process Engine (step policy) with c submitting threads: `of_raw` is the service's
throughput as a fraction of it. Then the same seeds are sampled under every policy and the PNG bytes
and float arrays compared. With --vs-diffusers N, N concurrent one-image requests (step policy) race
diffusers' DDIMPipeline making the same N images in one batch, same weights and steps.
Writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from app.engine.engine import POLICIES, Engine
from app.nets import load_checkpoint
from bench.common import save, set_threads, table
from bench.engines import Collector, sample_work
from bench.models import ARCHS, model_folder
from bench.sampling import diffusers_pipelines
from bench.server import serve

CHECK_SEEDS = (101, 102, 103, 104)  # sampled together under every policy; outputs must agree


@dataclass
class Load:
    """What one concurrency level measured."""

    window: float = 0.0  # seconds from the start to the end of counting
    latencies: list[float] = field(default_factory=list)  # of the requests answered inside the window

    def row(self, **keys: object) -> dict[str, object]:
        lat = sorted(self.latencies)
        return {
            **keys,
            "requests": len(lat),
            "images_s": round(len(lat) / self.window, 3) if self.window else 0.0,
            "p50_s": round(statistics.median(lat), 3) if lat else "",
            "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else "",
        }


def count_window(done: list[tuple[float, float]], start: float, deadline: float) -> Load:
    """Requests answered by the deadline, over the time to the deadline (or to the last answer, when every
    request was answered before it)."""
    inside = [(end, latency) for end, latency in done if end <= deadline]
    if not inside:
        return Load()
    end = deadline if len(inside) < len(done) else max(e for e, _ in inside)
    return Load(window=end - start, latencies=[latency for _, latency in inside])


async def http_load(url: str, body: dict, *, concurrency: int, duration: float, max_requests: int) -> Load:
    """Closed loop: `concurrency` clients, each sending its next request when the previous is answered."""
    issued = 0
    done: list[tuple[float, float]] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal issued
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                sent = time.perf_counter()
                r = await client.post("/sample", params={"wait": "true"}, json={**body, "seed": issued})
                job = r.raise_for_status().json()
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
                now = time.perf_counter()
                done.append((now, now - sent))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count_window(done, start, deadline)


def engine_load(
    engine: Engine, collector: Collector, *, concurrency: int, duration: float, max_requests: int, **job
) -> Load:
    """The same closed loop straight on an Engine: `concurrency` threads submitting and waiting."""
    lock = threading.Lock()
    issued = 0
    done: list[tuple[float, float]] = []
    start = time.perf_counter()
    deadline = start + duration

    def worker() -> None:
        nonlocal issued
        while time.perf_counter() < deadline:
            with lock:
                if issued >= max_requests:
                    return
                issued += 1
                job_id = f"raw-{concurrency}-{issued}"
            sent = time.perf_counter()
            engine.submit(sample_work(job_id, model=engine.name, n=1, seed=issued, **job))
            collector.wait(job_id)
            now = time.perf_counter()
            with lock:
                done.append((now, now - sent))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count_window(done, start, deadline)


async def sample_images(url: str, body: dict, seeds: tuple[int, ...]) -> dict[int, tuple[bytes, np.ndarray]]:
    """seed → (PNG bytes, float array) for one-image jobs sent together."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:

        async def one(seed: int) -> tuple[int, tuple[bytes, np.ndarray]]:
            job = (await client.post("/sample", params={"wait": "true"}, json={**body, "seed": seed})).json()
            png = (await client.get(job["result"]["images"][0]["url"])).content
            npy = (await client.get(job["result"]["npy_url"])).content
            return seed, (png, np.load(io.BytesIO(npy)))

        return dict(await asyncio.gather(*(one(seed) for seed in seeds)))


async def race(url: str, body: dict, n: int) -> float:
    """Seconds until `n` concurrent one-image requests are all answered."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(
            *(client.post("/sample", params={"wait": "true"}, json={**body, "seed": k}) for k in range(n))
        )
        assert all(a.json()["status"] == "succeeded" for a in answers)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (diffusers layout); default: --arch")
    parser.add_argument("--arch", default="bundled", choices=ARCHS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"))
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level at most")
    parser.add_argument("--max-requests", type=int, default=256, help="requests per level at most")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch intra-op threads, here and in the server")
    parser.add_argument("--vs-diffusers", type=int, default=16, help="0 skips the race against diffusers")
    args = parser.parse_args()
    set_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    folder, described = model_folder(args.model, args.arch)
    threads = torch.get_num_threads()
    print(f"model: {described}; {args.device}, {threads} threads, {args.sampler}-{args.steps}")
    body = {"n": 1, "steps": args.steps, "sampler": args.sampler, "stream_every": 0}
    job = dict(steps=args.steps, sampler=args.sampler)

    rows: list[dict[str, object]] = []
    raw = _raw_engine(folder, args, levels, job)
    rows += raw
    raw_rate = {r["concurrency"]: r["images_s"] for r in raw}
    images: dict[str, dict[int, tuple[str, np.ndarray]]] = {}
    extra: dict[str, object] = {}
    for policy in args.policies.split(","):
        settings = dict(engine_policy=policy, max_batch=args.max_batch, max_queued_jobs=4 * max(levels) + 64)
        with serve(folder, device=args.device, threads=args.threads, **settings) as url:
            asyncio.run(http_load(url, body, concurrency=2, duration=60, max_requests=2))  # warm-up
            for c in levels:
                load = asyncio.run(
                    http_load(
                        url, body, concurrency=c, duration=args.duration, max_requests=args.max_requests
                    )
                )
                row = load.row(impl=f"http {policy}", concurrency=c)
                row["of_raw"] = round(row["images_s"] / raw_rate[c], 3) if raw_rate.get(c) else ""
                rows.append(row)
                print(table(rows[-1:], list(row)), flush=True)
            images[policy] = asyncio.run(sample_images(url, body, CHECK_SEEDS))
            if policy == "step" and args.vs_diffusers:
                extra["race"] = _race_diffusers(url, folder, body, args)
    extra["identical"] = _compare(images)
    print()
    print(table(rows, ["impl", "concurrency", "requests", "images_s", "p50_s", "p95_s", "of_raw"]))
    for key, value in extra.items():
        print(f"{key}: {value}")
    path = save(
        "serving", rows, model=described, device=args.device, threads=torch.get_num_threads(), **job, **extra
    )
    print(f"wrote {path}")


def _raw_engine(folder: Path, args: argparse.Namespace, levels: list[int], job: dict) -> list[dict]:
    collector = Collector()
    engine = Engine(
        load_checkpoint(folder, device=args.device), name="raw", listener=collector, max_batch=args.max_batch
    )
    engine.start()
    engine_load(engine, collector, concurrency=2, duration=60, max_requests=2, **job)  # warm-up
    rows = []
    try:
        for c in levels:
            load = engine_load(
                engine,
                collector,
                concurrency=c,
                duration=args.duration,
                max_requests=args.max_requests,
                **job,
            )
            rows.append(load.row(impl="raw engine", concurrency=c, of_raw=1.0))
            print(table(rows[-1:], list(rows[-1])), flush=True)
    finally:
        engine.stop(10)
    return rows


def _race_diffusers(url: str, folder: Path, body: dict, args: argparse.Namespace) -> dict[str, object]:
    """N concurrent requests through the service vs one DDIMPipeline batch of N, same weights and steps."""
    n = args.vs_diffusers
    ours = asyncio.run(race(url, {**body, "sampler": "ddim"}, n))
    pipe = diffusers_pipelines(folder, torch.device(args.device))["ddim"]
    pipe(n, 2)  # set-up out of the timing
    start = time.perf_counter()
    pipe(n, args.steps)
    theirs = time.perf_counter() - start
    result = {
        "n": n,
        "steps": args.steps,
        "ours_http_s": round(ours, 3),
        "diffusers_batch_s": round(theirs, 3),
    }
    result["ratio"] = round(theirs / ours, 3)
    print(f"race: {result}", flush=True)
    return result


def _compare(images: dict[str, dict[int, tuple[bytes, np.ndarray]]]) -> dict[str, object]:
    """Every policy against the first: equal PNG bytes per seed? Else how many 8-bit pixels differ, by how
    much, and the largest difference of the float images."""
    policies = list(images)
    if not policies:
        return {}
    first = images[policies[0]]
    pixels = {p: {s: _pixels(images[p][s][0]) for s in CHECK_SEEDS} for p in policies}
    differing = [
        np.abs(pixels[p][s] - pixels[policies[0]][s]) for p in policies[1:] for s in CHECK_SEEDS
    ] or [np.zeros(1)]
    return {
        "policies": policies,
        "seeds": list(CHECK_SEEDS),
        "same_png_bytes": all(images[p][s][0] == first[s][0] for p in policies for s in CHECK_SEEDS),
        "pixels_differing": int(sum((d > 0).sum() for d in differing)),
        "pixels_total": int(sum(d.size for d in differing)),
        "max_pixel_diff": int(max(d.max() for d in differing)),
        "max_float_diff": max(
            float(np.abs(images[p][s][1] - first[s][1]).max()) for p in policies for s in CHECK_SEEDS
        ),
    }


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


if __name__ == "__main__":
    main()
