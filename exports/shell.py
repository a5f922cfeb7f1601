"""`tollgate export create|start|status|download`: the export API from a shell (docs/exports.md).

Talks to a running Tollgate over HTTP with an API key (``--key`` or ``TOLLGATE_API_KEY``);
the API is ``--url``, else the running ``tollgate up`` of the data directory, else
``http://TOLLGATE_API_HOST:TOLLGATE_API_PORT/v1``. Progress bars (tqdm) go to stderr;
stdout gets the facts, the export id last for ``create``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from tollgate.settings import Settings

METRIC_COLUMNS = ("id,trace_id,created_at,is_success,ai_org,ai_model,req_units,res_units,total_units,request_url,"
                  "cost,cost_currency,response_time,response_status_code,mode,config,prompt_slug,metadata")
FINAL = ("success", "failed", "stopped")


class ApiError(RuntimeError):
    pass


def api_url(settings: Settings, explicit: str | None) -> str:
    if explicit:
        return explicit.rstrip("/")
    from tollgate.stack import read_stack_file

    info = read_stack_file(settings)
    if info and info.get("api_url"):
        return info["api_url"].rstrip("/")
    return f"http://{settings.api_host}:{settings.api_port}/v1"


class Client:
    def __init__(self, url: str, key: str | None):
        if not key:
            raise ApiError("an API key is needed: --key or TOLLGATE_API_KEY (scopes exports.read / exports.write)")
        self.url, self.key = url, key

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"x-portkey-api-key": self.key, "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                parsed = json.loads(detail)["detail"]
                detail = "; ".join(e["msg"] for e in parsed) if isinstance(parsed, list) else str(parsed)
            except (ValueError, KeyError, TypeError):
                pass
            raise ApiError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise ApiError(f"cannot reach the API at {self.url}: {exc.reason}") from None


def create(client: Client, filters: dict, columns: list[str], fmt: str | None, workspace: str | None,
           description: str | None) -> dict:
    body: dict = {"filters": filters, "requested_data": columns}
    for name, value in (("format", fmt), ("workspace_id", workspace), ("description", description)):
        if value:
            body[name] = value
    return client.call("POST", "/logs/exports", body)


def follow(client: Client, export_id: str, out=sys.stderr, poll: float = 0.5) -> dict:
    """Poll the export until it ends, with a progress bar of rows written out of total."""
    item = client.call("GET", f"/logs/exports/{export_id}")
    bar = tqdm(total=item["total"], unit="rows", unit_scale=True, file=out, desc=f"export {export_id[:8]}")
    try:
        while True:
            bar.total = max(item["total"], item["rows_written"])
            bar.n = item["rows_written"]
            bar.set_postfix_str(item["status"])
            bar.refresh()
            if item["status"] in FINAL or item["status"] == "draft":
                return item
            time.sleep(poll)
            item = client.call("GET", f"/logs/exports/{export_id}")
    finally:
        bar.close()


def download(client: Client, export_id: str, out_dir: Path, err=sys.stderr) -> list[Path]:
    """Every file of the export and its manifest into ``out_dir``, checked against the manifest's SHA-256."""
    info = client.call("GET", f"/logs/exports/{export_id}/download")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [*info["files"], {"name": "manifest.json", "signed_url": info["manifest_url"], "bytes": None, "sha256": None}]
    total = sum(f["bytes"] or 0 for f in info["files"])
    written = []
    with tqdm(total=total, unit="B", unit_scale=True, file=err, desc="download") as bar:
        for f in entries:
            target = out_dir / f["name"]
            digest = hashlib.sha256()
            tmp = target.with_name(target.name + ".part")
            with urllib.request.urlopen(f["signed_url"], timeout=60) as r, open(tmp, "wb") as fh:
                while chunk := r.read(1 << 20):
                    fh.write(chunk)
                    digest.update(chunk)
                    if f["bytes"] is not None:
                        bar.update(len(chunk))
            if f["sha256"] and digest.hexdigest() != f["sha256"]:
                tmp.unlink(missing_ok=True)
                raise ApiError(f"{f['name']}: checksum mismatch (expected {f['sha256']}, got {digest.hexdigest()})")
            os.replace(tmp, target)
            written.append(target)
    return written


def run(args, settings: Settings) -> int:
    try:
        client = Client(api_url(settings, args.url), args.key or os.environ.get("TOLLGATE_API_KEY"))
        if args.export_command == "create":
            filters = json.loads(args.filters) if args.filters else {}
            if args.since:
                filters["time_of_generation_min"] = args.since
            if args.until:
                filters["time_of_generation_max"] = args.until
            columns = [c.strip() for c in args.columns.split(",") if c.strip()]
            r = create(client, filters, columns, args.format, args.workspace, args.description)
            print(f"created export {r['id']}: {r['total']} rows match")
            if args.start:
                client.call("POST", f"/logs/exports/{r['id']}/start")
                item = follow(client, r["id"])
                print(f"status: {item['status']}, {item['rows_written']} of {item['total']} rows written")
            print(r["id"])
            return 0
        if args.export_command == "start":
            client.call("POST", f"/logs/exports/{args.id}/start")
            print(f"started export {args.id}")
            if args.wait:
                item = follow(client, args.id)
                print(f"status: {item['status']}, {item['rows_written']} of {item['total']} rows written")
                return 0 if item["status"] == "success" else 1
            return 0
        if args.export_command == "status":
            item = follow(client, args.id) if args.wait else client.call("GET", f"/logs/exports/{args.id}")
            print(f"status: {item['status']}, {item['rows_written']} of {item['total']} rows written"
                  + (f", error: {item['error']}" if item.get("error") else ""))
            for f in item.get("files", []):
                print(f"  {f['name']}: {f['rows']} rows, {f['bytes']} bytes")
            return 0 if item["status"] != "failed" else 1
        if args.export_command == "download":
            paths = download(client, args.id, Path(args.out or f"export-{args.id}"))
            for p in paths:
                print(p)
            return 0
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"error: --filters is not JSON: {exc}", file=sys.stderr)
        return 2
    return 2


def add_parser(sub) -> None:
    ex = sub.add_parser("export", help="log exports through the API (create, start, status, download)")
    ex_sub = ex.add_subparsers(dest="export_command", required=True)

    def common(p):
        p.add_argument("--url", help="the API, e.g. http://127.0.0.1:8787/v1 (default: the running stack's)")
        p.add_argument("--key", help="API key (default: TOLLGATE_API_KEY)")
        p.add_argument("--data-dir")

    c = ex_sub.add_parser("create", help="create a draft export; prints the number of matching rows, then its id")
    c.add_argument("--since", help="time_of_generation_min, ISO 8601 with an offset")
    c.add_argument("--until", help="time_of_generation_max, ISO 8601 with an offset")
    c.add_argument("--filters", help="more filters as JSON (the spec's GenerationsFilterSchema)")
    c.add_argument("--columns", default=METRIC_COLUMNS, help="requested_data, comma-separated (default: no bodies)")
    c.add_argument("--format", choices=["jsonl", "parquet", "csv"], help="default jsonl")
    c.add_argument("--workspace", help="workspace slug (organisation keys; default: the default workspace)")
    c.add_argument("--description")
    c.add_argument("--start", action="store_true", help="start it too and follow its progress")
    common(c)
    s = ex_sub.add_parser("start", help="start a draft export")
    s.add_argument("id")
    s.add_argument("--wait", action="store_true", help="follow its progress until it ends")
    common(s)
    st = ex_sub.add_parser("status", help="an export's status and progress")
    st.add_argument("id")
    st.add_argument("--wait", action="store_true", help="follow its progress until it ends")
    common(st)
    d = ex_sub.add_parser("download", help="download every file of a finished export, checksums verified")
    d.add_argument("id")
    d.add_argument("--out", help="directory (default ./export-<id>)")
    common(d)
