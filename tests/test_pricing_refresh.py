"""`tollgate pricing refresh`, on temporary copies of the bundled table (never the real one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ingest.pricing import BUNDLED_DIR, PricingTable
from tollgate.cli import main



@pytest.fixture
def upstream_copy(tmp_path) -> Path:
    """A plain copy of Portkey-AI/models as distributed (pricing/, LICENSE, its own SOURCE.md
    naming the commit), rebuilt from the bundled table: the upstream note is the bundled
    note without Tollgate's own line."""
    src = tmp_path / "portkey-models"
    shutil.copytree(BUNDLED_DIR / "pricing", src / "pricing")
    shutil.copy(BUNDLED_DIR / "LICENSE", src / "LICENSE")
    note = [line for line in (BUNDLED_DIR / "SOURCE.md").read_text().splitlines() if "**Bundled into Tollgate**" not in line]
    (src / "SOURCE.md").write_text("\n".join(note) + "\n")
    return src


@pytest.fixture
def target(tmp_path) -> Path:
    dest = tmp_path / "pricing_data"
    shutil.copytree(BUNDLED_DIR, dest)
    return dest


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git checkout of a newer Portkey-AI/models: gpt-4o repriced, nomic.json removed, no SOURCE.md."""
    src = tmp_path / "models"
    shutil.copytree(BUNDLED_DIR / "pricing", src / "pricing")
    shutil.copy(BUNDLED_DIR / "LICENSE", src / "LICENSE")
    openai = json.loads((src / "pricing" / "openai.json").read_text())
    openai["gpt-4o"]["pricing_config"]["pay_as_you_go"]["request_token"]["price"] = 0.0002
    (src / "pricing" / "openai.json").write_text(json.dumps(openai))
    (src / "pricing" / "nomic.json").unlink()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_AUTHOR_DATE": "2026-11-01T12:00:00Z", "GIT_COMMITTER_DATE": "2026-11-01T12:00:00Z"}
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "prices"]):
        subprocess.run(["git", "-C", str(src), *cmd], check=True, env=env, capture_output=True)
    return src


def test_refresh_from_a_git_checkout(checkout, target, capsys):
    assert main(["pricing", "refresh", "--from", str(checkout), "--to", str(target)]) == 0
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=8", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert commit in capsys.readouterr().out
    copied = sorted(p.name for p in (target / "pricing").iterdir())
    assert copied == sorted(p.name for p in (checkout / "pricing").iterdir()) and "nomic.json" not in copied
    for name in copied:
        assert (target / "pricing" / name).read_bytes() == (checkout / "pricing" / name).read_bytes()
    assert PricingTable.from_dir(target / "pricing").rates("openai", "gpt-4o").request == 0.0002
    note = (target / "SOURCE.md").read_text()
    assert f"commit {commit} (2026-11-01)" in note  # the upstream paragraph and our line both name it
    assert note.count("**Bundled into Tollgate**") == 1 and "MIT licence" in note
    assert [p.name for p in target.iterdir() if p.name.startswith("pricing")] == ["pricing"]  # no staging left


def test_refresh_from_a_copy_with_a_source_note(upstream_copy, target):
    assert "commit f654307e (2026-08-21)" in (upstream_copy / "SOURCE.md").read_text()
    assert main(["pricing", "refresh", "--from", str(upstream_copy), "--to", str(target)]) == 0
    note = (target / "SOURCE.md").read_text()
    assert "**Bundled into Tollgate** from commit f654307e (2026-08-21)" in note
    assert (target / "LICENSE").read_bytes() == (upstream_copy / "LICENSE").read_bytes()


def test_a_bad_source_changes_nothing(tmp_path, target, capsys):
    before = {p.name: p.read_bytes() for p in (target / "pricing").iterdir()}
    note = (target / "SOURCE.md").read_text()
    bad = tmp_path / "bad"
    shutil.copytree(BUNDLED_DIR / "pricing", bad)
    (bad / "openai.json").write_text("{not json")
    assert main(["pricing", "refresh", "--from", str(bad), "--to", str(target)]) == 1
    assert "openai.json" in capsys.readouterr().err
    assert main(["pricing", "refresh", "--from", str(tmp_path / "empty"), "--to", str(target)]) == 1
    assert {p.name: p.read_bytes() for p in (target / "pricing").iterdir()} == before
    assert (target / "SOURCE.md").read_text() == note
