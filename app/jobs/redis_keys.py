"""Every Redis key and stream of distributed mode, in one place, so the API, the workers and the tests agree.

A job's keys share the hash tag `{id}`, so the Lua scripts that touch them together stay valid if the job
data is ever moved to a Redis Cluster; the queue streams do not (one Redis, or a primary with replicas,
is the supported set-up: see docs/distributed.md).
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"  # the one consumer group every worker of every model joins


@dataclass(frozen=True)
class Keys:
    prefix: str = "ddpm"

    def job(self, job_id: str) -> str:
        """Hash: the record's fields (JSON values, `status` plain) and `_`-prefixed bookkeeping."""
        return f"{self.prefix}:job:{{{job_id}}}"

    def job_affixes(self) -> tuple[str, str]:
        """What comes before and after the id in `job(id)`, for a script that reads the jobs a queue names."""
        before, _, after = self.job("\0").partition("\0")
        return before, after

    def events(self, job_id: str) -> str:
        """Stream of the job's events; entry `0-n` is event n, so Last-Event-ID maps to a stream id."""
        return f"{self.prefix}:job:{{{job_id}}}:events"

    def results(self, job_id: str) -> str:
        """Hash: result name ("0.png", "grid.png", …) -> bytes."""
        return f"{self.prefix}:job:{{{job_id}}}:results"

    def inputs(self, job_id: str) -> str:
        """Hash: input name ("latents", "a", …) -> .npy bytes; kept out of the queue entry so reading the
        queue (positions, metrics) never moves megabytes, and deleted when the job ends."""
        return f"{self.prefix}:job:{{{job_id}}}:inputs"

    def job_keys(self, job_id: str) -> list[str]:
        """The keys that live and expire together (the order the Lua scripts expect)."""
        return [self.job(job_id), self.events(job_id), self.results(job_id), self.inputs(job_id)]

    def queue(self, model: str) -> str:
        """Stream of work for one model, read by the consumer group `GROUP`."""
        return f"{self.prefix}:queue:{model}"

    def dead_letter(self, model: str) -> str:
        """Stream of entries that were delivered too often (their workers kept dying)."""
        return f"{self.prefix}:deadletter:{model}"

    @property
    def workers(self) -> str:
        """Set of worker names that have ever heartbeated (pruned when their heartbeat key is gone)."""
        return f"{self.prefix}:workers"

    def worker(self, name: str) -> str:
        """A worker's heartbeat: its info as JSON, with a TTL a live worker keeps renewing."""
        return f"{self.prefix}:worker:{name}"

    @property
    def models(self) -> str:
        """Hash: model name -> ModelSpec JSON, published by the workers that serve it."""
        return f"{self.prefix}:models"
