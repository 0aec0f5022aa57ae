#!/bin/sh
# The image's entrypoint: one role per container, configured by DDPM_* environment variables.
#   api     ddpm-serve: the HTTP API (with DDPM_REDIS_URL: stateless, jobs go to the workers;
#           without it: embedded, engines in this process, a one-container service)
#   worker  ddpm-worker: engines fed from the Redis queues (needs DDPM_REDIS_URL); its Prometheus
#           /metrics on DDPM_WORKER_METRICS_PORT
# Arguments after the role go to the program (`worker --model /models/cifar10 --device cuda:1`).
# Anything else runs as given (`ddpm sample …`, `sh`). `exec` makes the program PID 1, so SIGTERM
# from `docker stop` or Kubernetes reaches it directly and starts its graceful shutdown.
set -eu

role="${1:-api}"
[ "$#" -gt 0 ] && shift

case "$role" in
    api)
        exec ddpm-serve "$@"
        ;;
    worker)
        if [ -z "${DDPM_REDIS_URL:-}" ]; then
            echo "entrypoint: the worker role needs DDPM_REDIS_URL (the Redis its jobs come from)" >&2
            exit 64
        fi
        exec ddpm-worker "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
