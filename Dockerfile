# syntax=docker/dockerfile:1
# KARMA images. Every stage installs with the same script CI runs (`./run setup`), only with other
# knobs (KARMA_EXTRAS, KARMA_MODEL_WHEELS, ...); tests/test_packaging.py and tests/test_deploy.py
# check that this file, ./run, pyproject.toml and the config schema stay in step.
#
#   runtime (the default, last stage)  CPU serving image: torch-free, the `serve` extra
#       docker build -t karma-search .
#       docker run -p 8000:8000 -v $PWD/artifacts/bundles/default:/bundle:ro \
#           -e KARMA_SERVE__REDIS_URL=redis://redis:6379/0 karma-search
#   trainer  training + export: `train,serve` extras, the data/model wheels, CPU torch from PyTorch's
#            CPU index (installed first, pinned, as ./run does); the compose `bundle-init` service uses it
#       docker build --target trainer -t karma-search-train .
#   gpu      GPU serving: CUDA 12.8 + cuDNN 9 runtime, Python 3.11, the `gpu` extra (onnxruntime-gpu,
#            faiss-gpu-cu12) and never the CPU onnxruntime / faiss-cpu (DESIGN §8); ORT's CUDA provider
#       docker build --target gpu -t karma-search:gpu .
#       docker run --gpus 1 -p 8000:8000 -v $PWD/artifacts/bundles/default:/bundle:ro karma-search:gpu

# ---- what every install copies from the build context (one list for all stages) -----------------
FROM scratch AS sources
WORKDIR /app
COPY pyproject.toml README.md run ./
COPY karma ./karma
COPY training ./training
COPY export ./export
COPY service ./service
COPY bench ./bench
COPY recipes ./recipes

# ---- CPU serving: build ------------------------------------------------------------------------
FROM python:3.11-slim AS build
COPY --from=sources /app /app
WORKDIR /app
ENV KARMA_VENV=/opt/venv KARMA_EXTRAS=serve KARMA_MODEL_WHEELS=0 KARMA_EDITABLE=0
RUN ./run setup

# ---- training + export (bundle-init) -----------------------------------------------------------
# The serving venv plus torch (CPU, first and pinned), the `train` extra and the data/model wheels.
FROM build AS trainer
ENV KARMA_EXTRAS=train,serve KARMA_MODEL_WHEELS=1 KARMA_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN ./run setup
RUN useradd --create-home --uid 10001 karma
# Every KARMA_* variable below is a config key (KARMA_<SECTION>__<KEY>) or one of ./run's knobs
# (karma.config.ENV_RESERVED); tests/test_deploy.py checks each with load_config.
ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    KARMA_PATHS__ARTIFACTS=/home/karma/artifacts
USER karma
WORKDIR /home/karma
CMD ["karma", "--help"]

# ---- GPU serving -------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS gpu-base
# Ubuntu 22.04's own python3.11 (jammy-updates); the venv lives at the same path in both stages.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-build
COPY --from=sources /app /app
WORKDIR /app
# `gpu` = serve-core + onnxruntime-gpu + faiss-gpu-cu12: never `serve`, which brings the CPU builds.
ENV KARMA_VENV=/opt/venv KARMA_EXTRAS=gpu KARMA_MODEL_WHEELS=0 KARMA_EDITABLE=0 KARMA_PYTHON=python3.11
RUN ./run setup

FROM gpu-base AS gpu
RUN useradd --create-home --uid 10001 karma
COPY --from=gpu-build /opt/venv /opt/venv
# serve.providers=cuda: refuse to start without ORT's CUDA provider instead of silently serving on CPU.
ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    KARMA_SERVE__BUNDLE=/bundle KARMA_SERVE__PROVIDERS=cuda
USER karma
WORKDIR /home/karma
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["karma", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]

# ---- CPU serving: runtime (the default target) -------------------------------------------------
FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 karma
COPY --from=build /opt/venv /opt/venv
# Every KARMA_* variable is read as a config key by `karma` (KARMA_<SECTION>__<KEY>); an unknown one is
# an error at start, so only real keys go here (tests/test_deploy.py checks them with load_config).
ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    KARMA_SERVE__BUNDLE=/bundle
USER karma
WORKDIR /home/karma
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["karma", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]
