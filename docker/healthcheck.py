"""The image's HEALTHCHECK: exit 0 if this container's server answers, 1 otherwise.

A container runs one role, so whichever of the two answers is this container's: the API's `/healthz`
on DDPM_PORT (200 while the process is up) or a worker's Prometheus `/metrics` on
DDPM_WORKER_METRICS_PORT (served once its models are loaded). Standard library only: it runs every
few seconds and must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_SECONDS = 3.0


def targets() -> list[str]:
    urls = [f"http://127.0.0.1:{os.environ.get('DDPM_PORT', '8000')}/healthz"]
    if os.environ.get("DDPM_WORKER_METRICS_PORT"):
        urls.append(f"http://127.0.0.1:{os.environ['DDPM_WORKER_METRICS_PORT']}/metrics")
    return urls


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> int:
    return 0 if any(answers(url) for url in targets()) else 1


if __name__ == "__main__":
    sys.exit(main())
