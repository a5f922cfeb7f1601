"""compose.yaml cannot run here (no Docker engine); check what can be checked statically."""

from __future__ import annotations

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
