# syntax=docker/dockerfile:1
# MwT Hub image: the API, the workers and the CLI (`mwt ...`). Multi-stage, runs as non-root.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Dependencies first (cached while only the sources change).
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir -p mwt_core app worker \
 && touch mwt_core/__init__.py app/__init__.py worker/__init__.py \
 && pip install -c constraints.txt ".[service]" \
 && pip uninstall -y mwt-hub
COPY mwt_core ./mwt_core
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
# Editable install: the package (and its migrations/) stay in /app.
RUN pip install --no-deps -e .

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MWT_DATA_DIR=/data \
    MWT_API_HOST=0.0.0.0
RUN groupadd --system --gid 10001 mwt \
 && useradd --system --uid 10001 --gid mwt --home-dir /app --shell /usr/sbin/nologin mwt \
 && mkdir -p /data && chown mwt:mwt /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=root:root /app /app
WORKDIR /app
USER mwt
VOLUME ["/data"]
EXPOSE 8000
CMD ["mwt", "serve", "--host", "0.0.0.0"]
