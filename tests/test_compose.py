"""compose.yaml cannot run here (no Docker engine); check what can be checked statically."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tollgate.cli import parser
from tollgate.settings import Settings

COMPOSE = yaml.safe_load((Path(__file__).resolve().parent.parent / "compose.yaml").read_text())


def test_every_tollgate_command_exists_in_the_cli():
    commands = set(parser()._subparsers._group_actions[0].choices)
    used = [svc["command"][0] for svc in COMPOSE["services"].values() if svc.get("build")]
    assert used and set(used) <= commands, set(used) - commands


def test_every_tollgate_variable_is_a_setting():
    fields = {f"TOLLGATE_{name.upper()}" for name in Settings.model_fields}
    for name, svc in COMPOSE["services"].items():
        for var in svc.get("environment", {}) or {}:
            if var.startswith("TOLLGATE_"):
                assert var in fields, f"{name}: {var} is not a setting"


def test_images_are_pinned():
    for name, svc in COMPOSE["services"].items():
        if "image" in svc:
            repo, _, tag = svc["image"].rpartition(":")
            assert repo and tag and tag != "latest", f"{name}: {svc['image']} is not pinned"


SERVICES = COMPOSE["services"]
TOLLGATE = {name: svc for name, svc in SERVICES.items() if svc.get("build")}


def test_every_production_role_runs_as_its_own_service():
    roles = {svc["command"][0]: name for name, svc in TOLLGATE.items()}
    assert {"migrate", "ingest", "api", "scheduler"} <= set(roles), roles
    assert SERVICES[roles["ingest"]]["deploy"]["replicas"] == 2
    migrate = SERVICES[roles["migrate"]]
    assert migrate["restart"] == "no"  # one-shot
    for role in ("ingest", "api", "scheduler"):  # start after the migrations succeeded
        assert SERVICES[roles[role]]["depends_on"][roles["migrate"]] == {"condition": "service_completed_successfully"}


def test_depends_on_names_services_and_waits_only_for_healthchecks_that_exist():
    for name, svc in SERVICES.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}'s health, which has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert SERVICES[dep].get("restart") == "no", f"{dep} is waited for as a one-shot but restarts"


def test_the_export_bucket_is_created_by_a_one_shot_before_the_roles_that_write_it():
    env = TOLLGATE["api"]["environment"]
    assert env["TOLLGATE_EXPORT_DESTINATION"] == "s3"
    bucket = env["TOLLGATE_EXPORT_S3_BUCKET"]
    endpoint = env["TOLLGATE_EXPORT_S3_ENDPOINT"]
    minio = next(name for name, svc in SERVICES.items() if svc.get("image", "").startswith("minio/minio:"))
    assert endpoint == f"http://{minio}:9000"
    setup = [name for name, svc in SERVICES.items() if svc.get("image", "").startswith("minio/mc:")]
    assert len(setup) == 1
    mc = SERVICES[setup[0]]
    script = " ".join(mc["command"])
    assert f"mb --ignore-existing tg/{bucket}" in script and endpoint in script
    assert mc["restart"] == "no" and mc["depends_on"][minio] == {"condition": "service_healthy"}
    # the credentials the roles use are the ones the bucket was made with
    assert f"{env['TOLLGATE_EXPORT_S3_ACCESS_KEY_ID']} {env['TOLLGATE_EXPORT_S3_SECRET_ACCESS_KEY']}" in script
    for role in ("api", "scheduler"):  # on-demand exports and scheduled ones
        assert TOLLGATE[role]["depends_on"][setup[0]] == {"condition": "service_completed_successfully"}


def test_every_image_and_volume_is_declared():
    volumes = set(COMPOSE.get("volumes") or {})
    configs = COMPOSE.get("configs") or {}
    for name, svc in SERVICES.items():
        assert svc.get("image") or svc.get("build"), name
        for mount in svc.get("volumes") or []:
            source = mount.split(":", 1)[0]
            assert source.startswith(("/", ".")) or source in volumes, f"{name}: volume {source} is not declared"
        for config in svc.get("configs") or []:
            assert config["source"] in configs, f"{name}: config {config['source']} is not declared"


def test_the_clickhouse_server_has_the_uncompressed_cache_analytics_reads_use():
    """Off in a server's defaults; analytics queries ask for it (use_uncompressed_cache)."""
    from warehouse.queries.analytics import FINAL_SETTINGS

    assert FINAL_SETTINGS["use_uncompressed_cache"] == 1
    mounted = {c["source"]: c["target"] for c in SERVICES["clickhouse"]["configs"]}
    assert mounted["clickhouse-cache"].startswith("/etc/clickhouse-server/config.d/")
    size = re.search(r"<uncompressed_cache_size>(\d+)</uncompressed_cache_size>", COMPOSE["configs"]["clickhouse-cache"]["content"])
    assert size and int(size.group(1)) >= 512 * 2**20
