"""A worker's side of the job queues: one Redis Stream per model, read through the consumer group `workers`.

Delivery rules, all Redis's own: an entry read with XREADGROUP is pending on this consumer until XACK;
an entry idle (no claim refresh) past the reclaim time is taken over with XAUTOCLAIM, which counts the
delivery; a live worker refreshes its entries every heartbeat so they never look idle. Acknowledged
entries are deleted, so a queue's length is exactly waiting + in flight.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis
from redis.exceptions import ResponseError

from app.jobs import redis_lua as lua
from app.jobs.redis_keys import GROUP, Keys

log = logging.getLogger(__name__)

_MAX_CLAIM_ROUNDS = 10  # XPENDING IDLE + XCLAIM rounds per queue and pass
DEAD_LETTER_MAXLEN = 10_000  # approximate cap: the dead-letter stream is for inspection, not a backlog


@dataclass(frozen=True)
class Delivery:
    """One queue entry handed to this worker."""

    model: str
    queue: str
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int  # how many times the entry has been handed to a worker, this time included
    reclaimed: bool  # taken over from another (dead or stalled) worker, or from this name's previous life

    @property
    def job_id(self) -> str:
        return self.fields[b"job"].decode()


@dataclass(frozen=True)
class QueueStats:
    waiting: int  # never delivered
    pending: int  # delivered, not acknowledged (in flight)
    lag: int  # the group's lag as Redis reports it (= waiting here; what KEDA's Redis Streams scaler reads)


class QueueConsumer:
    """Reads, takes over, keeps alive, hands back and acknowledges this worker's entries."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        name: str,
        models: list[str],
        reclaim_idle_ms: int,
        max_deliveries: int,
    ):
        self.redis = client
        self.keys = keys
        self.name = name
        self.queues = {keys.queue(model): model for model in models}
        self.reclaim_idle_ms = reclaim_idle_ms
        self.max_deliveries = max_deliveries
        self._reclaim_own = client.register_script(lua.RECLAIM_OWN)
        self._prune = client.register_script(lua.PRUNE_CONSUMERS)

    def ensure_groups(self) -> None:
        """Create each queue and its group (from the start of the stream, so nothing queued is skipped)."""
        for queue in self.queues:
            try:
                self.redis.xgroup_create(queue, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def read(self, count: int, block_ms: int) -> list[Delivery]:
        """New entries of any of this worker's queues, waiting up to `block_ms` for one."""
        try:
            reply = self.redis.xreadgroup(
                GROUP, self.name, {queue: ">" for queue in self.queues}, count=count, block=block_ms
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self.ensure_groups()  # Redis came back without its data: start over with empty queues
            return []
        return [
            Delivery(self.queues[queue.decode()], queue.decode(), entry_id.decode(), fields, 1, False)
            for queue, entries in reply or []
            for entry_id, fields in entries
            if fields
        ]

    def take_over(self, count: int) -> list[Delivery]:
        """Up to `count` entries idle past the reclaim time (their worker died or stalled), now this one's.

        XPENDING's IDLE filter finds them wherever they are among the live workers' entries (XAUTOCLAIM
        looks at only 10 × COUNT entries per call), and XCLAIM with the same minimum idle time takes
        only those still idle, so two workers taking over at once never both get one."""
        taken: list[Delivery] = []
        for queue, model in self.queues.items():
            for _ in range(_MAX_CLAIM_ROUNDS):  # a round that finds only deleted entries drops them
                wanted = count - len(taken)
                if wanted <= 0:
                    return taken
                idle = self.redis.xpending_range(
                    queue, GROUP, min="-", max="+", count=wanted, idle=self.reclaim_idle_ms
                )
                if not idle:
                    break
                taken += self._claim(queue, model, idle, self.reclaim_idle_ms)
        return taken

    def own_leftovers(self, into: dict[tuple[str, str], Delivery]) -> None:
        """Claim back the entries still pending on this worker's name from a previous process with the
        same name, adding each to `into` ((queue, entry id) -> Delivery) as soon as it is claimed: a
        retry after a Redis error claims, and counts as a delivery, only those not claimed yet."""
        for queue, model in self.queues.items():
            pending = self.redis.xpending_range(
                queue, GROUP, min="-", max="+", count=1000, consumername=self.name
            )
            mine = [p for p in pending if (queue, p["message_id"].decode()) not in into]
            for delivery in self._claim(queue, model, mine, 0):
                into[(queue, delivery.entry_id)] = delivery

    def _claim(self, queue: str, model: str, pending: list[dict], min_idle_ms: int) -> list[Delivery]:
        """XCLAIM the entries XPENDING listed (`pending`) that are still idle `min_idle_ms`; each a Delivery
        counting this claim (XCLAIM adds one to the `times_delivered` XPENDING said). Entries deleted
        from the stream meanwhile come back without fields: Redis drops them from the group, and so do we."""
        times = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        if not times:
            return []
        claimed = self.redis.xclaim(queue, GROUP, self.name, min_idle_ms, list(times))
        return [
            Delivery(model, queue, entry_id.decode(), fields, times[entry_id] + 1, True)
            for entry_id, fields in claimed
            if fields
        ]

    def keep_alive(self, entries: dict[str, list[str]]) -> set[str]:
        """Reset the idle time of this worker's entries (queue -> ids); the ids it no longer owns."""
        return self._claim_own(entries, idle_ms=0)

    def hand_back(self, entries: dict[str, list[str]]) -> set[str]:
        """Make entries look idle past the reclaim time, so another worker takes them over at once."""
        return self._claim_own(entries, idle_ms=self.reclaim_idle_ms + 1)

    def _claim_own(self, entries: dict[str, list[str]], idle_ms: int) -> set[str]:
        lost: set[str] = set()
        for queue, ids in entries.items():
            if ids:
                reply = self._reclaim_own(keys=[queue], args=[GROUP, self.name, idle_ms, *ids])
                lost.update(entry_id.decode() for entry_id in reply)
        return lost

    def prune_consumers(self) -> int:
        """Delete the group's consumers that hold nothing and whose worker has no heartbeat (each restart
        of a worker named HOST-PID leaves one behind); how many were deleted."""
        deleted = 0
        for queue in self.queues:
            consumers = self.redis.xinfo_consumers(queue, GROUP)
            names = [c["name"].decode() for c in consumers if c["pending"] == 0]
            names = [name for name in names if name != self.name]
            if names:
                keys = [queue, *(self.keys.worker(name) for name in names)]
                deleted += self._prune(keys=keys, args=[GROUP, *names])
        return deleted

    def ack(self, delivery: Delivery) -> None:
        """Done with an entry: acknowledge and delete it (together, so queue length = waiting + pending)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(delivery.queue, GROUP, delivery.entry_id)
            pipe.xdel(delivery.queue, delivery.entry_id)
            pipe.execute()

    def dead_letter(self, delivery: Delivery, reason: str) -> str:
        """Copy an entry to the model's dead-letter stream (with why and when); returns that stream's key."""
        key = self.keys.dead_letter(delivery.model)
        fields = {k.decode(): v for k, v in delivery.fields.items()}
        fields |= {
            "entry": delivery.entry_id,
            "deliveries": str(delivery.deliveries),
            "reason": reason,
            "worker": self.name,
            "at": json.dumps(time.time()),
        }
        self.redis.xadd(key, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        return key

    def stats(self) -> dict[str, QueueStats]:
        """Per model: entries waiting, in flight, and the group's lag."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in self.queues:
                pipe.xlen(queue)
                pipe.xpending(queue, GROUP)
                pipe.xinfo_groups(queue)
            replies = pipe.execute(raise_on_error=False)
        out: dict[str, QueueStats] = {}
        for i, model in enumerate(self.queues.values()):
            length, pending, groups = replies[3 * i : 3 * i + 3]
            if isinstance(length, Exception) or isinstance(pending, Exception):
                continue
            waiting = int(length) - int(pending["pending"])
            lags = (
                []
                if isinstance(groups, Exception)
                else [g.get("lag") for g in groups if g["name"] == GROUP.encode()]
            )
            lag = lags[0] if lags and lags[0] is not None else waiting
            out[model] = QueueStats(waiting=waiting, pending=int(pending["pending"]), lag=int(lag))
        return out
