"""`ddpm-worker`: the engine processes of distributed mode, fed from Redis Streams (docs/distributed.md)."""

from app.worker.worker import Worker

__all__ = ["Worker"]
