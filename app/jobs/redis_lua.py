"""The Lua scripts behind every multi-step change of distributed mode, and the argument encoding they share.

Each change that must not interleave with another (a status transition checked against the current
status, an event appended with the next id, a job completed at most once, a job created and queued
together with the queue-depth check) is one script, so Redis runs it atomically: there is no
read-check-write window for a second worker, API replica or a takeover to slip into. The async store
(API) and the sync writer (worker) send the same scripts with the same arguments.

Job keys are, in order, KEYS[1..4] = job hash, events stream, results hash, inputs hash (Keys.job_keys).
In the job hash `status` is stored plain (the scripts compare it) and every other record field as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from app.jobs.records import RECORD_FIELDS, JobRecord, Status
from app.jobs.store import InvalidTransition, JobEnded, JobNotFound

# Shared by every script: the status machine of records.py, expiry, event append.
_PRELUDE = r"""
local TERMINAL = {succeeded = true, failed = true, cancelled = true}
local NEXT = {
  queued = {running = true, failed = true, cancelled = true},
  running = {succeeded = true, failed = true, cancelled = true},
}
local function allowed(current, new)
  return current == new or (NEXT[current] ~= nil and NEXT[current][new] == true)
end
-- An ended job's keys expire together ttl ms after its last change; a job that has not ended (queued,
-- however long, or running) keeps them: its client must find it while a worker may still run it.
local function touch(ttl)
  local ended = TERMINAL[redis.call('HGET', KEYS[1], 'status')]
  for i = 1, 4 do
    if ended then redis.call('PEXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
  end
end
local function append(etype, data)
  local n = redis.call('HINCRBY', KEYS[1], '_events', 1)
  redis.call('XADD', KEYS[2], '0-' .. n, 'type', etype, 'data', data)
  if etype ~= 'progress' then redis.call('HSET', KEYS[1], '_final', '1') end
  return n
end
local function hset_pairs(key, first, last)
  for i = first, last, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
end
"""

# The jobs a queue's workers have not taken yet: its entries after the consumer group's last delivery
# (none claimed yet) whose job is still queued, as {job id, owner JSON}; at most `most` entries read. A job
# that left the queue without its entry (its record lost) is left out like one that left with it
# (cancelled: XDEL). It reads the job hashes the entries name (one Redis, not a Cluster). Used by WAITING
# (queue positions) and SUBMIT (an owner's waiting jobs).
_WAITING_JOBS = r"""
local function waiting_jobs(queue, group, most, before, after)
  local start = '-'
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', queue)
  if ok then
    for _, g in ipairs(groups) do
      local info = {}
      for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
      if info['name'] == group then start = '(' .. info['last-delivered-id'] end
    end
  end
  local jobs = {}
  for _, entry in ipairs(redis.call('XRANGE', queue, start, '+', 'COUNT', most)) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'job' then
        local job = redis.call('HMGET', before .. fields[i + 1] .. after, 'status', 'owner')
        if job[1] == 'queued' then jobs[#jobs + 1] = {fields[i + 1], job[2]} end
      end
    end
  end
  return jobs
end
"""

# ARGV: ttl_ms, field, value, …  ->  1, or 0 when the id is taken.
CREATE = (
    _PRELUDE
    + r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
hset_pairs(KEYS[1], 2, #ARGV)
touch(ARGV[1])
return 1
"""
)

# ARGV: ttl_ms, new status or '', field, value, …
#   ->  {'ok', hgetall…} | {'missing'} | {'invalid', current} | {'ended'} (no status, after the final event)
UPDATE = (
    _PRELUDE
    + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if ARGV[2] == '' and redis.call('HEXISTS', KEYS[1], '_final') == 1 then return {'ended'} end
if ARGV[2] ~= '' then
  local current = redis.call('HGET', KEYS[1], 'status')
  if not allowed(current, ARGV[2]) then return {'invalid', current} end
  redis.call('HSET', KEYS[1], 'status', ARGV[2])
end
hset_pairs(KEYS[1], 3, #ARGV)
touch(ARGV[1])
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, 'ok')
return out
"""
)

# ARGV: ttl_ms, type, data  ->  the event id, 0 when the job is unknown, -1 after its final event.
APPEND = (
    _PRELUDE
    + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], '_final') == 1 then return -1 end
local n = append(ARGV[2], ARGV[3])
touch(ARGV[1])
return n
"""
)

# ARGV: ttl_ms, name, bytes  ->  1, or 0 when the job is unknown.
PUT_RESULT = (
    _PRELUDE
    + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
touch(ARGV[1])
return 1
"""
)

# The one way a worker ends a job: status, fields, results and the final event in one step, and only if
# the job has not ended yet, so two workers finishing the same job after a takeover store one result and
# make one transition. ARGV: ttl_ms, status, event type, event data, n, n field/value pairs, result
# name/bytes pairs  ->  'ok' | 'missing' | the terminal status it already had | 'invalid:<current>' (a
# status that is not terminal).
END = (
    _PRELUDE
    + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local current = redis.call('HGET', KEYS[1], 'status')
if TERMINAL[current] then return current end
-- From queued too: the worker holds the job's entry, so it ran it, even if its 'running' write was lost
-- (a Redis that restarted from a file without its last second).
if not TERMINAL[ARGV[2]] then return 'invalid:' .. current end
local last = 5 + 2 * tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'status', ARGV[2])
hset_pairs(KEYS[1], 6, last)
hset_pairs(KEYS[3], last + 1, #ARGV)
redis.call('DEL', KEYS[4])
append(ARGV[3], ARGV[4])
touch(ARGV[1])
return 'ok'
"""
)

# DELETE from the API. A queued job is cancelled here and now (its queue entry removed, so no worker
# starts it); a running one gets a `_cancel` mark its worker polls. KEYS[5]: the job's queue.
# ARGV: ttl_ms, finished_at JSON  ->  'cancelled' (by this call: the caller counts it) | 'requested' |
# 'missing' | 'ended:<terminal status>' (it had ended already, cancelled or not).
CANCEL = (
    _PRELUDE
    + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local current = redis.call('HGET', KEYS[1], 'status')
if TERMINAL[current] then return 'ended:' .. current end
if current == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
  local entry = redis.call('HGET', KEYS[1], '_entry')
  if entry then redis.call('XDEL', KEYS[5], entry) end
  redis.call('DEL', KEYS[4])
  append('done', '{"status": "cancelled"}')
  touch(ARGV[1])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], '_cancel', '1')
return 'requested'
"""
)

# Create a job and queue it, refusing when the queues are full, or when its owner (an API key) has its
# limit of jobs waiting: one step, so concurrent API replicas cannot overfill them. KEYS[5]: the model's
# queue; KEYS[6…]: every other model's queue (for the totals).
# Waiting entries are those not yet delivered: acknowledged entries are deleted, so XLEN − pending. An
# owner's waiting jobs are read from the queues themselves (`waiting_jobs` with that owner), so no counter
# can drift when jobs start, end, are cancelled, expire or are dead-lettered.
# ARGV: ttl_ms, max_queued, group, max per owner ('' = no limit), owner (JSON, as in the job hash), the job
# key before the id, after it, n, n field/value pairs, m, m input name/bytes pairs, entry pairs
#   ->  {'ok', waiting in this queue (= the job's position)} | {'full', waiting in all} |
#       {'owner_full', the owner's jobs waiting} | {'exists', 0}
SUBMIT = (
    _PRELUDE
    + _WAITING_JOBS
    + r"""
local group = ARGV[3]
local function waiting(queue)
  local ok, pending = pcall(redis.call, 'XPENDING', queue, group)
  local inflight = 0
  if ok then inflight = pending[1] end
  return redis.call('XLEN', queue) - inflight
end
local function owned(queue, owner, most)
  local count = 0
  for _, job in ipairs(waiting_jobs(queue, group, most, ARGV[6], ARGV[7])) do
    if job[2] == owner then count = count + 1 end
  end
  return count
end
local queued = 0
for i = 5, #KEYS do queued = queued + waiting(KEYS[i]) end
if queued >= tonumber(ARGV[2]) then return {'full', queued} end
if ARGV[4] ~= '' then
  local mine = 0
  for i = 5, #KEYS do mine = mine + owned(KEYS[i], ARGV[5], ARGV[2]) end
  if mine >= tonumber(ARGV[4]) then return {'owner_full', mine} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', 0} end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[5], group, '0', 'MKSTREAM')
local last = 8 + 2 * tonumber(ARGV[8])
hset_pairs(KEYS[1], 9, last)
local last_input = last + 1 + 2 * tonumber(ARGV[last + 1])
hset_pairs(KEYS[4], last + 2, last_input)
local entry = {}
for i = last_input + 1, #ARGV do entry[#entry + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[5], '*', unpack(entry))
redis.call('HSET', KEYS[1], '_entry', id)
touch(ARGV[1])
return {'ok', waiting(KEYS[5])}
"""
)

# The jobs waiting in one queue, in order, for the API's queue positions (`waiting_jobs`): one step, so an
# entry claimed meanwhile is never counted.
# KEYS[1]: a queue. ARGV: group, most entries, the job key before the id, after it  ->  job ids.
WAITING = (
    _WAITING_JOBS
    + r"""
local ids = {}
for _, job in ipairs(waiting_jobs(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])) do
  ids[#ids + 1] = job[1]
end
return ids
"""
)

# A worker re-claims its own pending entries: with IDLE 0 every heartbeat (so a live worker's long job
# is never taken over), or with IDLE = the reclaim time on SIGTERM (so others take them over at once).
# Only entries it still owns: one taken over while it stalled stays with its new owner.
# KEYS[1]: a queue. ARGV: group, consumer, idle_ms, entry ids…  ->  the ids it no longer owns.
RECLAIM_OWN = r"""
local lost = {}
for i = 4, #ARGV do
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #mine == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# Forget consumers of workers that are gone: ones with nothing pending and no heartbeat key, checked and
# deleted in one step (deleting a consumer drops its pending entries, so a check done apart from the
# delete could lose an entry claimed in between). KEYS[1]: a queue; KEYS[2…]: the candidates' heartbeat
# keys. ARGV: group, the candidates' names  ->  how many were deleted.
PRUNE_CONSUMERS = r"""
local deleted = 0
for i = 2, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[i])
  if #pending == 0 and redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[i])
    deleted = deleted + 1
  end
end
return deleted
"""


def to_json(value: Any) -> str:
    """A record field as stored: JSON, datetimes as ISO 8601 (what JobRecord.from_dict reads back)."""
    return json.dumps(value, default=_default, separators=(",", ":"))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def record_pairs(job: JobRecord) -> list[str]:
    """Every field of a new record as field/value pairs for the job hash."""
    data = job.to_dict()
    pairs: list[str] = []
    for name, value in data.items():
        pairs += [name, value if name == "status" else to_json(value)]
    return pairs


def change_args(changes: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(new status or '', field/value pairs of the other changes); ValueError for unknown fields or `id`."""
    unknown = set(changes) - RECORD_FIELDS
    if unknown or "id" in changes:
        raise ValueError(f"cannot update job fields {sorted(unknown | ({'id'} & set(changes)))}")
    status = str(Status(changes["status"])) if "status" in changes else ""
    pairs: list[str] = []
    for name, value in changes.items():
        if name != "status":
            pairs += [name, to_json(value)]
    return status, pairs


def record_from_hash(flat: Mapping[bytes | str, bytes | str]) -> JobRecord:
    """A JobRecord from the job hash (HGETALL), bookkeeping fields dropped."""
    data: dict[str, Any] = {}
    for key, raw in flat.items():
        name = key.decode() if isinstance(key, bytes) else key
        if name not in RECORD_FIELDS:
            continue
        text = raw.decode() if isinstance(raw, bytes) else raw
        data[name] = text if name == "status" else json.loads(text)
    return JobRecord.from_dict(data)


def pairs_to_dict(flat: list[Any]) -> dict[Any, Any]:
    """[k1, v1, k2, v2, …] (a script's HGETALL) -> {k1: v1, …}."""
    return dict(zip(flat[0::2], flat[1::2], strict=True))


def ttl_ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def updated_record(job_id: str, status: str | None, reply: list[bytes]) -> JobRecord:
    """The job after an UPDATE script's `reply`; JobNotFound, InvalidTransition or JobEnded if it refused."""
    outcome = reply[0].decode()
    if outcome == "missing":
        raise JobNotFound(job_id)
    if outcome == "ended":
        raise JobEnded(job_id)
    if outcome == "invalid":
        raise InvalidTransition(job_id, Status(reply[1].decode()), Status(status))
    return record_from_hash(pairs_to_dict(reply[1:]))
