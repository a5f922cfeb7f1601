# The Tollgate image for production roles (migrate, ingest, api, scheduler) against a
# ClickHouse server and a Kafka cluster. The embedded extras (chdb, Tansu) are not
# needed there.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tollgate ./tollgate
COPY ingest ./ingest
COPY warehouse ./warehouse
COPY analytics_api ./analytics_api
COPY exports ./exports
COPY migrations ./migrations
COPY spec ./spec
RUN pip install --no-cache-dir -e .
ENTRYPOINT ["tollgate"]
