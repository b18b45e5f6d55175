# syntax=docker/dockerfile:1
# Serving image: torch-free (ONNX Runtime + FAISS + FastAPI + Redis client).
#
# It installs with the same script CI runs (`./run setup`), only with other knobs: the `serve`
# extra alone, no model/data wheels, a non-editable install. tests/test_packaging.py checks that
# this file and ./run stay in step. The HTTP service itself lands with the service issue; until
# then `karma serve` says so and exits 2.
#
#   docker build -t karma-search .
#   docker run -p 8000:8000 -v $PWD/artifacts/bundle:/bundle:ro karma-search

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
ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    KARMA_BUNDLE=/bundle
USER karma
WORKDIR /home/karma
EXPOSE 8000
CMD ["karma", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]
