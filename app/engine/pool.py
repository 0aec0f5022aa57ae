"""One engine per loaded model; routes work and cancellations by model name."""

from __future__ import annotations

from app.engine.engine import Engine, Policy
from app.engine.fastpath import FastPath
from app.engine.work import Listener, Work
from app.nets import Checkpoint


class EnginePool:
    """The models a process serves. The first name is the default model."""

    def __init__(
        self,
        checkpoints: dict[str, Checkpoint],
        *,
        listener: Listener,
        max_batch: int = 64,
        policy: Policy = "step",
        fast: FastPath | None = None,
    ):
        if not checkpoints:
            raise ValueError("an engine pool needs at least one model")
        cpu = sum(ckpt.device.type == "cpu" for ckpt in checkpoints.values())
        self.engines = {
            name: Engine(
                ckpt,
                name=name,
                listener=listener,
                max_batch=max_batch,
                policy=policy,
                fast=fast,
                cpu_engines=cpu,
            )
            for name, ckpt in checkpoints.items()
        }
        self.default = next(iter(checkpoints))

    def start(self) -> None:
        for engine in self.engines.values():
            engine.start()

    def stop(self, timeout: float | None = None) -> None:
        for engine in self.engines.values():
            engine.stop(timeout)

    def submit(self, work: Work) -> None:
        self.engines[work.model].submit(work)

    def cancel(self, job_id: str, model: str) -> bool:
        engine = self.engines.get(model)
        return engine is not None and engine.cancel(job_id)

    @property
    def alive(self) -> bool:
        return all(engine.alive for engine in self.engines.values())

    def stalled(self, limit: float) -> list[str]:
        """The models whose engine has been in one pass of its loop (one step) for over `limit` seconds;
        none when `limit` is 0 (DDPM_ENGINE_STALL_SECONDS = 0: never)."""
        if not limit:
            return []
        return [name for name, engine in self.engines.items() if engine.stalled_for() > limit]
