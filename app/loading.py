"""Loading the configured models, shared by `ddpm-serve` (embedded engines) and `ddpm-worker`."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from app import metrics
from app.settings import Settings

if TYPE_CHECKING:
    from app.nets import Checkpoint

log = logging.getLogger(__name__)


def load_models(settings: Settings) -> dict[str, Checkpoint]:
    """Load every configured model onto the settings' device, keyed by name (first = default)."""
    from app.nets import resolve_model

    device = settings.engine_device()  # a device this machine lacks is one line, not a traceback
    checkpoints: dict[str, Checkpoint] = {}
    for ref in settings.model_refs():
        start = time.perf_counter()
        ckpt = resolve_model(ref, device=device)
        seconds = time.perf_counter() - start
        if ckpt.name in checkpoints:
            raise ValueError(
                f"two models are named {ckpt.name!r} ({checkpoints[ckpt.name].source} and {ref}); "
                f"name one of them: NAME={ref}"
            )
        checkpoints[ckpt.name] = ckpt
        metrics.MODEL_LOAD_SECONDS.labels(model=ckpt.name).set(seconds)
        log.info("loaded model %s from %s on %s in %.1f s", ckpt.name, ref, device, seconds)
    return checkpoints
