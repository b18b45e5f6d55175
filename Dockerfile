# syntax=docker/dockerfile:1
# Serving image: torch-free (ONNX Runtime + FAISS + FastAPI + Redis client).
#
# It installs with the same script CI runs (`./run setup`), only with other knobs: the `serve`
# extra alone, no model/data wheels, a non-editable install. tests/test_packaging.py checks that
# this file and ./run stay in step.
#
#   docker build -t karma-search .
#   docker run -p 8000:8000 -v $PWD/artifacts/bundles/default:/bundle:ro \
#       -e KARMA_SERVE__REDIS_URL=redis://redis:6379/0 karma-search

FROM python:3.11-slim AS build
WORKDIR /app
COPY pyproject.toml README.md run ./
COPY karma ./karma
COPY training ./training
COPY export ./export
COPY service ./service
ENV KARMA_VENV=/opt/venv KARMA_EXTRAS=serve KARMA_MODEL_WHEELS=0 KARMA_EDITABLE=0
RUN ./run setup

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
