# syntax=docker/dockerfile:1.7
# The ddpm-serve image: one Dockerfile, two variants (docs/deployment.md).
#
#   docker build -t ddpm-serve:gpu .                          torch with CUDA: GPU workers (and the API)
#   docker build --build-arg VARIANT=cpu -t ddpm-serve:cpu .  CPU-only torch, several GB smaller
#
# Roles (docker/entrypoint.sh): `api` (the default: ddpm-serve) or `worker` (ddpm-worker); any other
# command runs as given (`docker run --rm ddpm-serve:cpu ddpm sample --n 4 --out /tmp/grid.png`).
# Both variants use python:3.11-slim and the same torch==2.13.0 pin (constraints.txt). The GPU variant
# takes torch from PyPI, whose Linux x86_64 wheel is the CUDA build and brings the CUDA runtime (cuBLAS,
# cuDNN, …) as nvidia-* wheels, so a CUDA base image would only add a second copy; the host provides the
# driver through the NVIDIA Container Toolkit. TORCH_INDEX_URL picks another CUDA build, e.g.
# https://download.pytorch.org/whl/cu126 for an older driver. The CPU variant takes PyTorch's CPU index.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VARIANT=gpu

FROM ${PYTHON_IMAGE} AS python
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# ---- deps: the virtual environment without the project's code, cached until pyproject.toml or
# constraints.txt change (a code change rebuilds only the small layers after it).
FROM python AS deps
ARG VARIANT
ARG TORCH_INDEX_URL=""
WORKDIR /src
COPY pyproject.toml constraints.txt ./
ENV PATH=/opt/venv/bin:$PATH \
    PIP_CONSTRAINT=/src/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
    && case "$VARIANT" in \
         cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
         gpu) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
         *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1 ;; \
       esac \
    && pip install --index-url "$index" torch==2.13.0 \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['hub']))" > requirements.txt \
    && pip install -r requirements.txt "setuptools>=68" \
    && python -c "import sys, torch; cuda = torch.version.cuda; \
sys.exit(0 if (cuda is None) == ('$VARIANT' == 'cpu') else f'$VARIANT image got torch {torch.__version__}')"

# ---- the runtime: per-variant settings, then the same layers for both.
FROM python AS runtime-cpu

FROM python AS runtime-gpu
# Read by the NVIDIA Container Toolkit (Docker's --gpus and compose device reservations, Kubernetes'
# device plugin sets its own): expose the GPUs and the driver's compute libraries.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# DL3006 (tag the image) does not apply: runtime-${VARIANT} is a stage of this file, not an image.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
ARG VARIANT
ARG UID=10001
LABEL org.opencontainers.image.title="ddpm-serve" \
      org.opencontainers.image.description="HTTP inference service for DDPMs (Ho et al. 2020), ${VARIANT} build" \
      org.opencontainers.image.licenses="MIT"
# A C++ compiler, for DDPM_COMPILE=true: torch.compile's inductor builds its CPU kernels with g++ and
# Triton (the GPU variant's kernels) its launchers with cc, which g++ brings (gcc). The pin is for bookworm,
# the base image's Debian release: change the two together.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid "$UID" ddpm \
    && useradd --system --uid "$UID" --gid ddpm --home-dir /home/ddpm --create-home --shell /usr/sbin/nologin ddpm
COPY --from=deps /opt/venv /opt/venv
# Every DDPM_* variable is a field of app/settings.py (`ddpm-serve --help` lists them). Containers
# listen on all interfaces; the worker serves its Prometheus /metrics on 8001. Checkpoints other than
# the bundled model are mounted under /models (read-only) and named in DDPM_MODELS. Caches go to /tmp,
# the one writable place under a read-only root filesystem (HOME is not writable), torch.compile's too:
# inductor's kernels (.so files it loads, so /tmp must not be mounted noexec) and Triton's.
ENV PATH=/opt/venv/bin:$PATH \
    DDPM_HOST=0.0.0.0 \
    DDPM_PORT=8000 \
    DDPM_WORKER_METRICS_PORT=8001 \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton
WORKDIR /app
COPY pyproject.toml README.md ./
COPY app/ app/
# The bundled model must load (it is the default when DDPM_MODELS is empty); fail the build otherwise.
# The MNIST classifier (1 MB) is `ddpm eval`'s default --classifier.
COPY models/mnist/ models/mnist/
COPY models/mnist-classifier/ models/mnist-classifier/
COPY --chmod=0755 docker/entrypoint.sh docker/healthcheck.py docker/
# An editable install: BUNDLED_MODEL is found next to the code (/app/models/mnist). Byte-compiled
# here, since the code is read-only at run time.
RUN pip install --no-deps --no-build-isolation --no-cache-dir -e . \
    && python -m compileall -q app \
    && python -c "from app.cli import BUNDLED_MODEL; from app.nets import resolve_model; \
print(resolve_model(str(BUNDLED_MODEL)).name)" \
    && python -c "from app.evaluation.cli import DEFAULT_CLASSIFIER; \
from app.evaluation.classifier import load_classifier; load_classifier(DEFAULT_CLASSIFIER)" \
    && ddpm --help > /dev/null && ddpm-serve --help > /dev/null && ddpm-worker --help > /dev/null \
    && mkdir /models
USER ${UID}:${UID}
EXPOSE 8000 8001
# The API's /healthz, or a worker's /metrics: whichever server this container runs (docker/healthcheck.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["api"]
