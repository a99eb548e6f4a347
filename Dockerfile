# meterproxy: a cost-metering reverse proxy for LLM APIs.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY pricing ./pricing
# The project itself, with its Redis/PostgreSQL extra (pinning applies to packages, not ".").
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[scale]' \
    && useradd --system --uid 10001 --home-dir /data --create-home meter

USER 10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8787

# The SQLite usage log lives on the /data volume; bind 0.0.0.0 inside the container.
ENTRYPOINT ["meterproxy", "serve", "--host", "0.0.0.0", "--port", "8787"]
