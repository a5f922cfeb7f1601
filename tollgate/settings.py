"""All configuration, from environment variables prefixed ``TOLLGATE_``.

Every field here is documented in README.md ("Settings"). A field added here is
a public setting; compose.yaml may only set variables that exist here.
"""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from warehouse.cluster import check_cluster_name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_", extra="ignore")

    # -- where things live -------------------------------------------------
    data_dir: Path = Field(Path(".tollgate"), description="Embedded warehouse, runtime state, local exports.")
    clickhouse_dsn: str | None = Field(
        None, description="chdb:///abs/path (embedded, default <data dir>/warehouse) or http(s)://user:pass@host:8123/db."
    )
    kafka_bootstrap: str | None = Field(None, description="host:port[,host:port]; unset = start the embedded broker.")

    # -- topics ------------------------------------------------------------
    topic_gateway_logs: str = "tollgate.gateway-logs"
    topic_feedback: str = "tollgate.feedback"
    topic_audit: str = "tollgate.audit"
    topic_dead_letter: str = "tollgate.dead-letter"
    topic_partitions: int = Field(6, ge=1, description="Partitions for topics that Tollgate creates.")

    # -- ingest ------------------------------------------------------------
    ingest_batch_size: int = Field(30_000, ge=1, description="Flush a batch at this many events ...")
    ingest_batch_seconds: float = Field(1.0, gt=0, description="... or when the oldest event waited this long.")
    ingest_max_event_bytes: int = Field(1_048_576, ge=1024, description="Larger events are dead-lettered.")
    ingest_consumer_group: str = "tollgate-ingest"
    ingest_workers: int = Field(1, ge=1, description="Ingest worker processes; each runs one consumer per topic.")
    ingest_retry_max_seconds: float = Field(30.0, gt=0, description="Cap of the insert retry back-off.")
    ingest_fault_file: Path | None = Field(
        None, description="Fault injection: while this file exists every ingest insert fails (a warehouse outage drill)."
    )

    # -- warehouse -----------------------------------------------------------
    retention_days: int = Field(365, ge=0, description="TTL of generations in days; 0 keeps rows forever.")
    audit_retention_days: int = Field(365, ge=0, description="TTL of audit_logs in days; 0 keeps rows forever.")
    settle_interval_seconds: float = Field(
        300.0, ge=0, description="How often `tollgate up` merges each ended day of generations into one part; 0 = never."
    )
    settle_max_days: int = Field(31, ge=1, description="Most days one settle pass merges (newest first).")
    uncompressed_cache_mb: int = Field(
        512, ge=0, description="Embedded warehouse: memory for the decompressed column blocks analytics reads reuse "
        "(ClickHouse's uncompressed cache); 0 = off. A ClickHouse server has its own (uncompressed_cache_size).",
    )
    clickhouse_cluster: str | None = Field(
        None, description="Cluster mode: `tollgate migrate` creates replicated local tables and Distributed tables "
                          "ON CLUSTER this name (docs/deploy.md)."
    )
    scheduler_lease_seconds: float = Field(
        30.0, ge=3, description="Time to live of the scheduler lease; the holder renews it every third of that."
    )

    @field_validator("clickhouse_cluster")
    @classmethod
    def _cluster(cls, value):
        return check_cluster_name(value) if value else None

    # -- audit trail -------------------------------------------------------------
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs of reverse proxies whose X-Forwarded-For is believed (comma-separated in the environment).",
    )
    geoip_db: Path | None = Field(None, description="MaxMind GeoLite2/GeoIP2 Country or City .mmdb file; unset = no country.")

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _cidrs(cls, value):
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
        items = [v for v in items if v]
        for cidr in items:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad entry
        return items

    # -- limits (docs/limits.md) -------------------------------------------------
    limits_interval: float = Field(5.0, gt=0, description="Seconds between two refreshes of the limit counters.")
    topic_limit_alerts: str = "tollgate.limit-alerts"
    topic_limits_state: str = "tollgate.limits-state"

    # -- tenancy defaults -------------------------------------------------------
    default_organisation: str = Field("default-org", description="Organisation of the admin key `tollgate up` creates; seed default.")
    default_workspace: str = Field("default", description="Workspace used when an organisation key names none; seed default.")

    # -- API ------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8787
    auth_cache_seconds: float = Field(2.0, ge=0, description="How long a verified key is trusted before re-checking.")
    logs_max_items: int = Field(1_000, ge=1, description="Most custom logs one POST /v1/logs takes; more is a 413.")
    logs_max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest POST /v1/logs body in bytes; larger is a 413."
    )
    feedback_max_items: int = Field(1_000, ge=1, description="Most feedback items one POST /v1/feedback takes; more is a 413.")
    publish_timeout_seconds: float = Field(
        10.0, gt=0, description="How long a request waits for Kafka to acknowledge its events (or audit record); then a 503."
    )

    # -- operations (docs/operations.md) ------------------------------------------
    log_format: Literal["json", "text"] = Field("json", description="Log lines as JSON objects, or plain text.")
    metrics_host: str = Field("127.0.0.1", description="Address of the metrics server of roles without an API.")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Port of the metrics server (/metrics) of `tollgate ingest` and `limits`; unset = none."
    )
    shutdown_grace_seconds: float = Field(
        30.0, gt=0, description="After SIGTERM a role finishes its batch and commits within this; then it exits anyway (code 1)."
    )

    # -- exports (docs/exports.md) ---------------------------------------------------
    export_destination: Literal["local", "s3"] = Field(
        "local", description="Where exports are written: the local export dir, or the S3-compatible bucket below."
    )
    export_dir: Path | None = Field(None, description="Local destination directory; default <data dir>/exports.")
    export_s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL; unset = AWS's default for the region.")
    export_s3_bucket: str | None = Field(None, description="Bucket of the s3 destination (required for it).")
    export_s3_prefix: str = Field("tollgate", description="Key prefix of everything Tollgate writes in the bucket.")
    export_s3_region: str = Field("us-east-1", description="Region of the bucket (and of presigned URLs).")
    export_s3_access_key_id: str | None = Field(None, description="Unset = boto3's default credential chain.")
    export_s3_secret_access_key: str | None = Field(None, description="Secret of the access key above.")
    export_part_rows: int = Field(1_000_000, ge=1, description="A file holds at most this many rows; more go to the next part.")
    export_row_group_rows: int = Field(
        262_144, ge=1_024, description="Most rows in one Parquet row group (fewer when rows are wide: about 64 MiB of data)."
    )
    export_url_ttl_seconds: int = Field(3_600, ge=1, le=604_800, description="Lifetime of a download URL.")
    export_signing_secret: str | None = Field(
        None, description="HMAC secret of local download URLs; unset = generated once into <data dir>/export-signing.key."
    )
    export_workers: int = Field(
        2, ge=1, description="Exports that run at once in one API process, and scheduled windows at once; more wait their turn."
    )
    export_schedule_sync_seconds: float = Field(5.0, gt=0, description="How often the scheduler re-reads the schedules.")
    export_catchup_max_windows: int = Field(
        1_000, ge=1, description="Most missed windows one schedule catches up at once; older ones are recorded as skipped."
    )
    export_run_max_attempts: int = Field(3, ge=1, description="A failed scheduled window is retried until this many attempts.")

    @property
    def export_root(self) -> Path:
        return self.export_dir or self.data_dir / "exports"

    @cached_property
    def warehouse_dsn(self) -> str:
        dsn = self.clickhouse_dsn or f"chdb://{(self.data_dir / 'warehouse').resolve()}"
        if dsn.startswith("chdb:") and "?" not in dsn and self.uncompressed_cache_mb:
            dsn += f"?uncompressed_cache_size={self.uncompressed_cache_mb * 2**20}"  # chdb's startup options
        return dsn

    @property
    def is_embedded_warehouse(self) -> bool:
        return self.warehouse_dsn.startswith("chdb:")

    @property
    def event_topics(self) -> list[str]:
        return [self.topic_gateway_logs, self.topic_feedback, self.topic_audit]

    @property
    def all_topics(self) -> list[str]:
        return [*self.event_topics, self.topic_dead_letter]

    @property
    def limit_topics(self) -> dict[str, dict[str, str]]:
        """Topics of the limits job → their topic configs (the state feed is compacted)."""
        return {self.topic_limit_alerts: {}, self.topic_limits_state: {"cleanup.policy": "compact"}}

    @property
    def stack_file(self) -> Path:
        """Runtime facts of a running `tollgate up` (broker address, API URL, pid)."""
        return self.data_dir / "stack.json"


def load_settings(**overrides) -> Settings:
    return Settings(**overrides)
