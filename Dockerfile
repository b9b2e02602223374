# syntax=docker/dockerfile:1
# One image per function, all from this file and the same pyproject.toml:
#   docker build --target ingest .      (or writer, maintenance, query)
# skaffold.yaml builds all four. Every dependency ships as a wheel, so neither
# stage needs a compiler; the build stage exists so that pip, setuptools and the
# source tree stay out of the images.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric user, so that Kubernetes can verify runAsNonRoot.
RUN groupadd --system --gid 10001 audit \
    && useradd --system --uid 10001 --gid audit --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin audit
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY functions ./functions
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080 \
    FUNCTION_USE_ASGI=true
USER 10001:10001
EXPOSE 8080
# functions-framework reads FUNCTION_TARGET, FUNCTION_SIGNATURE_TYPE and
# FUNCTION_SOURCE (set per target below, and again by the Knative Service), and
# FUNCTION_USE_ASGI: every function is an aio function served by uvicorn workers.
CMD ["functions-framework"]

FROM runtime AS ingest
ENV FUNCTION_TARGET=ingest \
    FUNCTION_SIGNATURE_TYPE=http \
    FUNCTION_SOURCE=functions/ingest/main.py

FROM runtime AS writer
ENV FUNCTION_TARGET=write \
    FUNCTION_SIGNATURE_TYPE=http \
    FUNCTION_SOURCE=functions/writer/main.py

FROM runtime AS maintenance
ENV FUNCTION_TARGET=maintain \
    FUNCTION_SIGNATURE_TYPE=http \
    FUNCTION_SOURCE=functions/maintenance/main.py

FROM runtime AS query
ENV FUNCTION_TARGET=query \
    FUNCTION_SIGNATURE_TYPE=http \
    FUNCTION_SOURCE=functions/query/main.py
