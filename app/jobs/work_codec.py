"""`Work` across the queue: params as JSON in the stream entry, input arrays as .npy bytes in the job's
inputs hash (so the entry stays a few hundred bytes whatever the uploads weigh)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import numpy as np

from app.engine.work import Work
from app.jobs.encoding import npy_bytes


def entry_fields(work: Work) -> dict[str, str]:
    """The queue entry of a job: enough to route it and rebuild its `Work` with `work_from` (which checks
    that the inputs it names are still in the inputs hash)."""
    fields = {"job": work.job_id, "kind": work.kind, "model": work.model, "params": json.dumps(work.params)}
    if work.inputs:
        fields["inputs"] = json.dumps(sorted(work.inputs))
    return fields


def input_blobs(work: Work) -> dict[str, bytes]:
    return {
        name: npy_bytes(np.ascontiguousarray(array, dtype=np.float32)) for name, array in work.inputs.items()
    }


def work_from(fields: Mapping[bytes, bytes], inputs: Mapping[bytes, bytes]) -> Work:
    """The `Work` a worker runs, from a queue entry and the job's inputs hash (both as Redis returns them).
    ValueError when an input the entry names is gone (the hash was deleted): a sample would otherwise
    start from its seed's noise instead of its client's latents."""
    named = json.loads(fields.get(b"inputs", b"[]"))  # an entry queued before entries named them: none
    if missing := [name for name in named if name.encode() not in inputs]:
        raise ValueError(f"its inputs {', '.join(map(repr, missing))} are gone from Redis")
    return Work(
        job_id=fields[b"job"].decode(),
        kind=fields[b"kind"].decode(),
        model=fields[b"model"].decode(),
        params=json.loads(fields[b"params"]),
        inputs={
            name.decode(): np.load(io.BytesIO(data), allow_pickle=False) for name, data in inputs.items()
        },
    )
