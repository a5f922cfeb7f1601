"""``tollgate pricing refresh``: replace the bundled pricing table with a newer Portkey-AI/models.

The source is a checkout of https://github.com/Portkey-AI/models (cloned shallowly
when none is given) or any directory holding its ``pricing/*.json`` (or the JSON
files themselves). Every file must parse and at least one model must be priced,
otherwise nothing changes. The files are copied unchanged; ``LICENSE`` comes along
when the source has one; ``SOURCE.md`` records the version (the git commit, else
the commit a source ``SOURCE.md`` names, else a content hash), its date and the
refresh date. Running processes keep the table they loaded: restart them.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ingest.pricing import BUNDLED_DIR, read_dir

UPSTREAM = "https://github.com/Portkey-AI/models"
_COMMIT_NOTE = re.compile(r"commit ([0-9a-f]{7,40}) \((\d{4}-\d{2}-\d{2})\)")
_BUNDLED_LINE = re.compile(r"^- \*\*Bundled into Tollgate\*\*.*$", re.MULTILINE)


@dataclass(frozen=True)
class Refreshed:
    version: str
    date: str
    files: int
    models: int
    digest: str


def _git(source: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _version(source: Path, digest: str) -> tuple[str, str]:
    """(version, date) of the source: its git commit, the commit its SOURCE.md names, or the content hash."""
    commit = _git(source, "rev-parse", "--short=8", "HEAD") if (source / ".git").exists() else None
    if commit:
        return commit, _git(source, "log", "-1", "--format=%cs") or ""
    note = source / "SOURCE.md"
    if note.is_file() and (match := _COMMIT_NOTE.search(note.read_text(encoding="utf-8"))):
        return match[1], match[2]
    return f"sha256:{digest[:12]}", datetime.now(UTC).date().isoformat()


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _source_note(source: Path, target: Path, version: str, date: str, line: str) -> str:
    """The upstream note (the source's, else the current one with its commit updated) plus our line."""
    note = source / "SOURCE.md"
    if note.is_file():
        text = note.read_text(encoding="utf-8")
    else:
        current = target / "SOURCE.md"
        text = current.read_text(encoding="utf-8") if current.is_file() else "# Model pricing data\n"
        text = _COMMIT_NOTE.sub(f"commit {version} ({date})", text, count=1)
    text = _BUNDLED_LINE.sub("", text).rstrip() + "\n"
    return text + line + "\n"


def refresh(source: Path, target: Path = BUNDLED_DIR) -> Refreshed:
    """Copy ``source``'s pricing files into ``target``/pricing and update ``target``/SOURCE.md.

    Raises ValueError (and changes nothing) when the source holds no valid pricing files.
    """
    pricing = source / "pricing" if (source / "pricing").is_dir() else source
    files = sorted(pricing.glob("*.json"))
    if not files:
        raise ValueError(f"no pricing files (*.json) in {pricing}")
    models = len(read_dir(pricing))  # every file must parse
    if models == 0:
        raise ValueError(f"no priced model in {pricing}")
    digest = _digest(files)
    version, date = _version(source, digest)

    staging = Path(tempfile.mkdtemp(prefix="pricing.", dir=target))
    try:
        for f in files:
            shutil.copyfile(f, staging / f.name)
        dest = target / "pricing"
        old = target / "pricing.old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if (source / "LICENSE").is_file():
        shutil.copyfile(source / "LICENSE", target / "LICENSE")
    today = datetime.now(UTC).date().isoformat()
    line = (f"- **Bundled into Tollgate** from commit {version} ({date}) of Portkey-AI/models, refreshed {today} "
            f"with `tollgate pricing refresh`: `pricing/*.json` ({len(files)} files, {models} priced models, "
            f"sha256 {digest[:16]}) copied unchanged into `ingest/pricing_data/pricing/`, read by `ingest/pricing.py`.")
    (target / "SOURCE.md").write_text(_source_note(source, target, version, date, line), encoding="utf-8")
    return Refreshed(version, date, len(files), models, digest)


def refresh_from_upstream(target: Path = BUNDLED_DIR) -> Refreshed:
    """Shallow-clone Portkey-AI/models (needs git and network) and refresh from it."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", UPSTREAM, tmp], check=True)
        return refresh(Path(tmp), target)
