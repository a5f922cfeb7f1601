"""(b) Malformed events reach the dead-letter topic with a reason; the good events around them are stored.

Three layers:

- a corpus of malformed gateway logs and feedback events, checked against the
  decoders directly (fast, no broker);
- property tests: no input makes a decoder raise anything but ``InvalidEvent``, and
  whatever a decoder accepts can be turned into an Arrow batch (an exception there
  would fail the insert of the whole batch, not just the one event);
- the whole corpus, interleaved with good events, through Kafka and the ingest
  workers: every bad message is dead-lettered once, byte for byte, with its source
  coordinates and a reason; every good one is stored; the consumer groups commit to
  the end of every partition (bad input does not stall a worker).
"""

from __future__ import annotations

import copy
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Callable

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from conftest import count_generations, read_topic, wait_until
from factories import gateway_log, iso
from ingest.dead_letter import TRUNCATE_TO, DeadLetterQueue
from ingest.events import FEEDBACK, GENERATIONS, Codec, InvalidEvent, decode_feedback, decode_gateway_log
from ingest.pipeline import Message, build_pipeline
from ingest.producer import make_producer
from ingest.sink import DirectSink, insert_rows
from ingest.workers import IngestWorkers
from warehouse.client import connect
from warehouse.migrate import migrate

MAX_EVENT_BYTES = 64 * 1024
CORPUS_ORG = "org-corpus"

# --------------------------------------------------------------------------- corpus


@dataclass
class Case:
    label: str
    value: bytes | None
    reason: tuple[str, ...] = ()  # fragments the reason must contain (case-insensitive)
    log_id: str | None = None  # id the event would have been stored under, if it has one
    decoder_rejects: bool = True  # False: valid JSON, rejected by the pipeline (size, null value)
    key: bytes | None = None


def good_feedback(org: str, rng: random.Random, **overrides: Any) -> dict:
    ev = {
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "organisation_id": org,
        "created_at": iso(datetime(2026, 11, 20, tzinfo=UTC) + timedelta(milliseconds=rng.randrange(86_400_000))),
        "trace_id": f"trace-{rng.randrange(10**9)}",
        "value": rng.randrange(-10, 11),
        "weight": round(rng.random(), 3),
    }
    ev.update(overrides)
    return ev


def _dumps(ev: Any) -> bytes:
    return orjson.dumps(ev)


DEEP = b"[" * 1200 + b"]" * 1200  # valid JSON, 2.4 KB


def gateway_corpus(org: str, seed: int | str = 1) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []

    def mutated(label: str, mutate: Callable[[dict], Any], *reason: str) -> None:
        ev = gateway_log(org, rng=rng)
        mutate(ev)
        cases.append(Case(label, _dumps(ev), reason, log_id=ev.get("_id") or ev.get("id")))

    def raw(label: str, value: bytes, *reason: str, log_id: str | None = None) -> None:
        cases.append(Case(label, value, reason, log_id=log_id))

    def setm(name: str, value: Any) -> Callable[[dict], None]:
        return lambda ev: ev["metrics"].__setitem__(name, value)

    # -- not JSON / not a JSON object
    good = gateway_log(org, rng=rng)
    whole = _dumps(good)
    raw("truncated JSON", whole[: len(whole) // 2], "invalid JSON", log_id=good["_id"])
    good = gateway_log(org, rng=rng)
    raw("trailing garbage", _dumps(good) + b"}garbage", "invalid JSON", log_id=good["_id"])
    good = gateway_log(org, rng=rng)
    raw("not UTF-8 inside a string field", _dumps(good).replace(b'"POST"', b'"PO\xffST"', 1), "UTF-8", log_id=good["_id"])
    good = gateway_log(org, rng=rng)
    raw("not UTF-8 inside the request body", _dumps(good).replace(b'"hello"', b'"h\xe9llo"', 1), "UTF-8", log_id=good["_id"])
    raw("Latin-1 bytes", "{\"é\": 1}".encode("latin-1"), "UTF-8")
    raw("empty bytes", b"", "invalid JSON")
    raw("JSON array", _dumps([gateway_log(org, rng=rng)]), "object")
    raw("JSON string", b'"a gateway log"', "object")
    raw("JSON null", b"null", "object")
    raw("JSON number", b"42", "object")

    # -- missing required fields
    def no_id(ev: dict) -> None:
        del ev["_id"]
        del ev["metrics"]["id"]

    mutated("missing _id and id", no_id, "_id")
    mutated("missing created_at", lambda ev: ev.pop("created_at"), "created_at")
    mutated("missing organisation_id", lambda ev: ev.pop("organisation_id"), "organisation_id")
    mutated("missing request", lambda ev: ev.pop("request"), "request")
    mutated("missing response", lambda ev: ev.pop("response"), "response")
    mutated("missing request.url", lambda ev: ev["request"].pop("url"), "url")
    mutated("missing response.status", lambda ev: ev["response"].pop("status"), "status")
    mutated("empty _id", lambda ev: (ev.__setitem__("_id", ""), ev["metrics"].pop("id")), "_id")
    mutated("null organisation_id", lambda ev: ev.__setitem__("organisation_id", None), "organisation_id")

    # -- wrong types
    mutated("cost as a string", setm("cost", "0.5"), "cost")
    mutated("req_units as a string", setm("req_units", "12"), "req_units")
    mutated("response.status as a string", lambda ev: ev["response"].__setitem__("status", "200"), "status")
    mutated("metadata.key not a list", lambda ev: ev["metrics"].update({"metadata.key": "_user", "metadata.value": "x"}), "metadata")

    def numeric_metadata(ev: dict) -> None:
        m = ev["metrics"]
        del m["metadata.key"], m["metadata.value"]
        m["metadata"] = {"_user": "alice", "attempt": 3}

    mutated("metadata object with a number value", numeric_metadata, "metadata")
    mutated("request as a list", lambda ev: ev.__setitem__("request", [ev["request"]]), "request")
    mutated("created_at not a date", lambda ev: ev.__setitem__("created_at", "yesterday"), "created_at")
    mutated("created_at with a non-ASCII digit past the microsecond",
            lambda ev: ev.__setitem__("created_at", "2024-01-01T00:00:00.123456\u0667Z"), "created_at")
    mutated("is_success as \"yes\"", setm("is_success", "yes"), "is_success")
    mutated("_id as a number", lambda ev: ev.__setitem__("_id", 12345), "_id")
    mutated("request.headers as a list", lambda ev: ev["request"].__setitem__("headers", ["content-type"]), "request.headers")

    # -- valid JSON nested deeper than the decoder recurses (msgspec raises RecursionError near 1,000 levels:
    #    uncaught, it crashed the consumer at every restart and held back the events around it)
    good = gateway_log(org, rng=rng)
    raw("response.body nested 1,200 deep", _dumps(good).replace(b'"body":{"id":', b'"body":{"deep":' + DEEP + b',"id":', 1),
        "nested", log_id=good["_id"])

    def long_metrics_id(ev: dict) -> None:
        del ev["_id"]
        ev["metrics"]["id"] = "x" * 300

    mutated("metrics.id of 300 characters", long_metrics_id, "id")

    # -- out of range
    mutated("negative cost", setm("cost", -0.01), "cost")
    mutated("cost above 10^12 cents", setm("cost", 1.5e12), "cost")
    mutated("negative tokens", setm("req_units", -5), "req_units")
    mutated("response.status 99", lambda ev: ev["response"].__setitem__("status", 99), "status")
    mutated("response.status 600", lambda ev: ev["response"].__setitem__("status", 600), "status")
    mutated("metrics.response_status_code 600", setm("response_status_code", 600), "response_status_code")
    mutated("created_at in 1900", lambda ev: ev.__setitem__("created_at", "1900-01-01T00:00:00.000Z"), "created_at")
    mutated("created_at in 2300", lambda ev: ev.__setitem__("created_at", "2300-01-01T00:00:00.000Z"), "created_at")
    mutated("created_at year 1 east of UTC", lambda ev: ev.__setitem__("created_at", "0001-01-01T00:30:00+01:00"), "created_at")
    mutated("stream_mode 2", setm("stream_mode", 2), "stream_mode")
    mutated("retry_success_count -1", setm("retry_success_count", -1), "retry_success_count")
    mutated("response_time negative", setm("response_time", -1), "response_time")
    good = gateway_log(org, rng=rng)
    good["metrics"]["cost"] = 123.0
    raw("cost beyond float64", _dumps(good).replace(b'"cost":123.0', b'"cost":1e999', 1), "cost", log_id=good["_id"])

    def token_overflow(ev: dict) -> None:
        ev["metrics"].update(req_units=4_000_000_000, res_units=4_000_000_000)
        del ev["metrics"]["total_units"]

    mutated("req_units + res_units overflow total_units", token_overflow, "total_units")

    # -- inconsistent
    mutated("metadata.key/value lengths differ", setm("metadata.value", ["only-one"]), "metadata")

    def both_metadata_forms(ev: dict) -> None:
        ev["metrics"]["metadata"] = {"env": "prod"}

    mutated("both metadata forms", both_metadata_forms, "metadata")
    mutated("empty metadata key", lambda ev: ev["metrics"].update({"metadata.key": ["", "env"]}), "metadata")
    mutated("metrics.organisation_id differs", setm("organisation_id", "org-someone-else"), "organisation_id")

    # -- too big (valid JSON: only the pipeline rejects it)
    big = gateway_log(org, rng=rng)
    big["request"]["body"]["messages"][0]["content"] = "x" * (MAX_EVENT_BYTES + 10_000)
    cases.append(Case("oversized", _dumps(big), ("oversized",), log_id=big["_id"], decoder_rejects=False))
    # -- a tombstone (null value): only the pipeline sees it
    cases.append(Case("null value", None, ("null value",), decoder_rejects=False, key=b"tombstone-key"))

    labels = [c.label for c in cases]
    assert len(set(labels)) == len(labels)
    return cases


def feedback_corpus(org: str, seed: int | str = 2) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []

    def mutated(label: str, mutate: Callable[[dict], Any], *reason: str) -> None:
        ev = good_feedback(org, rng)
        mutate(ev)
        cases.append(Case(label, _dumps(ev), reason, log_id=ev.get("id")))

    mutated("value 11", lambda ev: ev.__setitem__("value", 11), "value")
    mutated("value -11", lambda ev: ev.__setitem__("value", -11), "value")
    mutated("weight 1.5", lambda ev: ev.__setitem__("weight", 1.5), "weight")
    mutated("missing trace_id", lambda ev: ev.pop("trace_id"), "trace_id")
    mutated("value \"5\"", lambda ev: ev.__setitem__("value", "5"), "value")
    mutated("missing id", lambda ev: ev.pop("id"), "id")
    mutated("created_at in 1900", lambda ev: ev.__setitem__("created_at", "1900-05-01T00:00:00Z"), "created_at")
    ev = good_feedback(org, rng)
    cases.append(Case("truncated JSON", _dumps(ev)[:20], ("invalid JSON",), log_id=ev["id"]))
    ev = good_feedback(org, rng, metadata={"k": "DEEP"})
    cases.append(Case("metadata nested 1,200 deep", _dumps(ev).replace(b'"DEEP"', DEEP), ("nested",), log_id=ev["id"]))
    return cases


GATEWAY_CORPUS = gateway_corpus(CORPUS_ORG)
FEEDBACK_CORPUS = feedback_corpus(CORPUS_ORG)


def test_corpus_is_big_enough():
    assert len(GATEWAY_CORPUS) >= 35
    assert len({c.value for c in GATEWAY_CORPUS}) == len(GATEWAY_CORPUS)


# --------------------------------------------------------------------------- decoders, directly


def _assert_reason(reason: str, case: Case) -> None:
    assert reason.strip(), case.label
    for fragment in case.reason:
        assert fragment.lower() in reason.lower(), f"{case.label}: reason {reason!r} does not mention {fragment!r}"


@pytest.mark.parametrize("case", [c for c in GATEWAY_CORPUS if c.decoder_rejects], ids=lambda c: c.label)
def test_decode_gateway_log_rejects(case: Case):
    with pytest.raises(InvalidEvent) as err:
        decode_gateway_log(case.value)
    _assert_reason(err.value.reason, case)


@pytest.mark.parametrize("case", FEEDBACK_CORPUS, ids=lambda c: c.label)
def test_decode_feedback_rejects(case: Case):
    with pytest.raises(InvalidEvent) as err:
        decode_feedback(case.value)
    _assert_reason(err.value.reason, case)


def test_oversized_event_is_otherwise_valid():
    (case,) = [c for c in GATEWAY_CORPUS if c.label == "oversized"]
    assert len(case.value) > MAX_EVENT_BYTES
    assert decode_gateway_log(case.value)[0] == case.log_id  # rejected for its size only


def test_good_events_decode():
    rng = random.Random(3)
    for _ in range(20):
        for codec, value in ((GENERATIONS, _dumps(gateway_log(CORPUS_ORG, rng=rng))),
                             (FEEDBACK, _dumps(good_feedback(CORPUS_ORG, rng)))):
            _SCRATCH["write"](codec, [codec.encode(value)])  # accepted and insertable


def test_feedback_metadata_with_big_integers_is_stored_as_text():
    ev = good_feedback(CORPUS_ORG, random.Random(4), metadata={"n": 2**70, "list": [1, None, "s"], "s": "x"})
    row = decode_feedback(msgspec.json.encode(ev))
    assert row[6] == ["n", "list", "s"]
    assert row[7] == [str(2**70), '[1,null,"s"]', "x"]


# --------------------------------------------------------------------------- pipeline steps on the real broker and warehouse


@pytest.mark.parametrize("limit", [None, 70_000], ids=["fits", "producer-refuses-whole"])
def test_pipeline_dead_letters_oversized_and_null(limit, settings, broker, warehouse, org):
    """The steps alone: an oversized and a null message become dead letters (truncated when the
    producer's request limit refuses the whole value); the good ones are inserted; all offsets commit."""
    (big,) = [c for c in GATEWAY_CORPUS if c.label == "oversized"]
    rng = random.Random(5)
    good = [_dumps(gateway_log(org, rng=rng)) for _ in range(2)]
    msgs = [
        Message("src", 0, 10, good[0]),
        Message("src", 0, 11, big.value, key=b"k1"),
        Message("src", 0, 12, None, key=b"k2"),
        Message("src", 0, 13, good[1]),
    ]
    producer = make_producer(broker.bootstrap, **({"max_request_size": limit} if limit else {}))
    committed: dict = {}
    pipe = build_pipeline(
        GENERATIONS, DirectSink(settings.warehouse_dsn), DeadLetterQueue(producer, settings.topic_dead_letter),
        committed.update, batch_size=1000, batch_seconds=60, max_event_bytes=MAX_EVENT_BYTES,
    )
    for m in msgs:
        pipe.submit(m)
    pipe.join(30)
    pipe.close()
    producer.close()

    assert committed == {("src", 0): 14}
    assert count_generations(warehouse, org) == 2
    letters = read_topic(broker.bootstrap, settings.topic_dead_letter, 2)
    oversized, tombstone = sorted(letters, key=lambda r: dict(r.headers)["tollgate.source.offset"])
    headers = [dict(r.headers) for r in (oversized, tombstone)]
    assert [h["tollgate.source.offset"] for h in headers] == [b"11", b"12"]
    assert b"oversized" in headers[0]["tollgate.reason"]
    assert oversized.key == b"k1"
    if limit is None:
        assert oversized.value == big.value and "tollgate.truncated" not in headers[0]
    else:
        assert oversized.value == big.value[:TRUNCATE_TO]
        assert headers[0]["tollgate.truncated"] == b"true"
    assert tombstone.value is None and tombstone.key == b"k2"
    assert b"null value" in headers[1]["tollgate.reason"]
    for h in headers:
        assert h["tollgate.source.topic"] == b"src"
        assert h["tollgate.source.partition"] == b"0"


def test_a_decoder_bug_dead_letters_the_event_and_the_partition_moves_on(settings, broker, warehouse, org):
    """An exception other than InvalidEvent from decoding (a bug that one input sets off) must not crash
    the consumer, which would stop at that message after every restart: the event is dead-lettered with
    the exception named, and the events around it are stored."""
    rng = random.Random(6)
    good = [_dumps(gateway_log(org, rng=rng)) for _ in range(2)]
    poison = b'{"sets off": "the bug"}'

    def buggy(value: bytes) -> tuple:
        if value == poison:
            raise KeyError("a decoder bug")
        return decode_gateway_log(value)

    codec = Codec(GENERATIONS.table, GENERATIONS.columns, buggy)
    producer = make_producer(broker.bootstrap)
    committed: dict = {}
    pipe = build_pipeline(codec, DirectSink(settings.warehouse_dsn), DeadLetterQueue(producer, settings.topic_dead_letter),
                          committed.update, batch_size=1000, batch_seconds=60, max_event_bytes=MAX_EVENT_BYTES)
    for offset, value in enumerate([good[0], poison, good[1]]):
        pipe.submit(Message("src", 0, offset, value))
    pipe.join(30)
    pipe.close()
    producer.close()

    assert committed == {("src", 0): 3}
    assert count_generations(warehouse, org) == 2
    (letter,) = read_topic(broker.bootstrap, settings.topic_dead_letter, 1)
    assert letter.value == poison
    assert b"KeyError" in dict(letter.headers)["tollgate.reason"]


def test_metrics_id_is_free_when_the_event_has_its_own_id():
    """metrics.id is held to 1-256 characters only when it is the event's id (no `_id`, no `id`)."""
    for metrics_id in ("", "x" * 300):
        ev = gateway_log(CORPUS_ORG, rng=random.Random(1))
        ev["metrics"]["id"] = metrics_id
        assert decode_gateway_log(_dumps(ev))[0] == ev["_id"]


def test_a_memory_error_while_decoding_stops_the_step_instead_of_dead_lettering(settings, broker, warehouse, org):
    """MemoryError says nothing about the event: it must not be dead-lettered and committed past (a valid event
    lost from the table); it propagates, so the worker stops and the event is consumed again."""
    good = _dumps(gateway_log(org, rng=random.Random(1)))
    raised = []

    def low_memory(value: bytes) -> tuple:
        if not raised:
            raised.append(1)
            raise MemoryError()
        return decode_gateway_log(value)

    producer = make_producer(broker.bootstrap)
    committed: dict = {}
    pipe = build_pipeline(Codec(GENERATIONS.table, GENERATIONS.columns, low_memory), DirectSink(settings.warehouse_dsn),
                          DeadLetterQueue(producer, settings.topic_dead_letter), committed.update, batch_size=1000,
                          batch_seconds=60, max_event_bytes=MAX_EVENT_BYTES)
    try:
        with pytest.raises(MemoryError):
            pipe.submit(Message("src", 0, 0, good))
        pipe.join(30)
    finally:
        pipe.close()
        producer.close()
    assert committed == {} and count_generations(warehouse, org) == 0


# --------------------------------------------------------------------------- property tests

_big_ints = st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
_json_scalar = (
    st.none() | st.booleans() | st.integers() | _big_ints | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    _json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
# RFC 3339 timestamps, favouring the edges: years 1 and 9999, the 1970..2200 bounds, far offsets
_ts = st.builds(
    lambda y, mo, d, h, mi, sec, off: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{sec:02d}{off}",
    st.sampled_from([1, 1969, 1970, 2026, 2199, 2200, 9999]) | st.integers(1, 9999),
    st.sampled_from([1, 12]) | st.integers(1, 12), st.sampled_from([1, 31]) | st.integers(1, 28),
    st.sampled_from([0, 23]) | st.integers(0, 23), st.integers(0, 59), st.integers(0, 59),
    st.sampled_from(["Z", "+00:00", "+14:00", "-14:00", "+05:30", "-00:30", ""]),
)
_units = st.sampled_from([-1, 0, 2**31, 2**32 - 1, 2**32]) | st.integers(0, 2**32 - 1)

_GATEWAY_PATHS = [
    ("_id",), ("id",), ("created_at",), ("organisation_id",), ("request",), ("response",), ("metrics",),
    ("request", "url"), ("request", "method"), ("request", "headers"), ("request", "body"), ("request", "portkeyHeaders"),
    ("response", "status"), ("response", "responseTime"), ("response", "headers"), ("response", "body"),
    ("response", "lastUsedOptionJsonPath"), ("transformedRequest",), ("originalResponse",),
    *[("metrics", k) for k in (
        "id", "organisation_id", "created_at", "is_success", "req_units", "res_units", "total_units", "cost",
        "response_status_code", "response_time", "stream_mode", "retry_success_count", "last_used_option_index",
        "metadata.key", "metadata.value", "metadata", "workspace_slug", "cache_status", "trace_id",
    )],
]
_FEEDBACK_PATHS = [("id",), ("organisation_id",), ("created_at",), ("updated_at",), ("trace_id",), ("value",),
                   ("weight",), ("metadata",), ("workspace_slug",)]
_DELETE = object()


def _mutate(base: dict, edits: list[tuple[tuple[str, ...], Any]]) -> dict:
    ev = copy.deepcopy(base)
    for path, value in edits:
        target = ev
        for part in path[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        if value is _DELETE:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
    return ev


_SCRATCH: dict[str, Callable[[Any, bytes], None]] = {}


@pytest.fixture(scope="module", autouse=True)
def scratch_warehouse(base_settings, warehouse):
    """A database of its own where every event the property tests accept is inserted."""
    db = f"scratch_{uuid.uuid4().hex[:8]}"
    warehouse.command(f"CREATE DATABASE {db}")
    client = connect(base_settings.warehouse_dsn, database=db)
    migrate(client)
    _SCRATCH["write"] = lambda codec, rows, metadata_values=None, traces=None: insert_rows(client, codec, rows, metadata_values, traces)
    yield
    _SCRATCH.clear()
    warehouse.command(f"DROP DATABASE {db}")


def _decodes_or_rejects(decode: Callable[[bytes], tuple], codec, value: bytes) -> None:
    try:
        decode(value)
        row = codec.encode(value)
    except InvalidEvent as exc:
        assert exc.reason
        return
    _SCRATCH["write"](codec, [row])  # an accepted event must also be insertable


_PROPS = hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPS
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_decoders(value):
    _decodes_or_rejects(decode_gateway_log, GENERATIONS, value)
    _decodes_or_rejects(decode_feedback, FEEDBACK, value)


@_PROPS
@given(st.dictionaries(st.text(max_size=15), _json, max_size=8) | _json)
def test_arbitrary_json_never_crashes_the_decoders(doc):
    value = msgspec.json.encode(doc)
    _decodes_or_rejects(decode_gateway_log, GENERATIONS, value)
    _decodes_or_rejects(decode_feedback, FEEDBACK, value)


_BASE_LOG = gateway_log(CORPUS_ORG, rng=random.Random(6))
_BASE_FEEDBACK = good_feedback(CORPUS_ORG, random.Random(6))


@_PROPS
@given(st.lists(st.tuples(st.sampled_from(_GATEWAY_PATHS), _json | _ts | st.just(_DELETE)), min_size=1, max_size=4))
def test_mutated_gateway_logs_never_crash_the_decoder(edits):
    _decodes_or_rejects(decode_gateway_log, GENERATIONS, msgspec.json.encode(_mutate(_BASE_LOG, edits)))


@_PROPS
@given(st.lists(st.tuples(st.sampled_from(_FEEDBACK_PATHS), _json | _ts | st.just(_DELETE)), min_size=1, max_size=4))
def test_mutated_feedback_never_crashes_the_decoder(edits):
    _decodes_or_rejects(decode_feedback, FEEDBACK, msgspec.json.encode(_mutate(_BASE_FEEDBACK, edits)))


_MARKER = "@@blob@@"


def _splice(doc: dict, blob: bytes) -> bytes:
    """Encode ``doc`` with ``blob`` (arbitrary bytes, maybe not UTF-8) inside the string that was the marker."""
    return msgspec.json.encode(doc).replace(_MARKER.encode(), blob, 1)


@_PROPS
@given(
    created=_ts, req=_units, res=_units, total=st.none() | _units,
    body=_json, blob=st.binary(max_size=12), in_body=st.booleans(),
)
def test_gateway_log_field_edges_never_crash_the_decoder(created, req, res, total, body, blob, in_body):
    ev = copy.deepcopy(_BASE_LOG)
    ev["created_at"] = created
    ev["metrics"].update(req_units=req, res_units=res, total_units=total)
    if total is None:
        del ev["metrics"]["total_units"]
    ev["request"]["body"] = {"messages": [{"content": _MARKER}], "extra": body} if in_body else body
    if not in_body:
        ev["metrics"]["trace_id"] = _MARKER
    _decodes_or_rejects(decode_gateway_log, GENERATIONS, _splice(ev, blob))


@_PROPS
@given(created=_ts, updated=st.none() | _ts, metadata=st.dictionaries(st.text(max_size=8), _json, max_size=4),
       blob=st.binary(max_size=12))
def test_feedback_field_edges_never_crash_the_decoder(created, updated, metadata, blob):
    ev = dict(_BASE_FEEDBACK, created_at=created, metadata=metadata, trace_id=_MARKER)
    if updated is not None:
        ev["updated_at"] = updated
    _decodes_or_rejects(decode_feedback, FEEDBACK, _splice(ev, blob))


# --------------------------------------------------------------------------- through Kafka


@dataclass
class Produced:
    case: Case
    topic: str
    partition: int
    offset: int


@dataclass
class Ingest:
    settings: Any
    groups: dict[str, str]  # topic -> consumer group


@pytest.fixture
def small_event_ingest(settings, broker, warehouse):
    """The ingest workers (every topic, as in production) with a 64 KiB event limit; the corpus uses two topics."""
    s = settings.model_copy(update={"ingest_max_event_bytes": MAX_EVENT_BYTES})
    pool = IngestWorkers(s, broker.bootstrap)
    pool.start()
    assert wait_until(lambda: len(pool.consumers) == len(s.event_topics))
    groups = {c.topic: c.consumer.config["group_id"] for c in pool.consumers if c.topic != s.topic_audit}
    assert set(groups) == {s.topic_gateway_logs, s.topic_feedback}
    yield Ingest(s, groups)
    pool.stop()


def _read_topic(bootstrap: str, topic: str, partitions: int, expected: int, timeout: float = 60.0) -> list:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","), group_id=None, auto_offset_reset="earliest",
        fetch_max_wait_ms=100, enable_auto_commit=False, consumer_timeout_ms=500,
    )
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        records: list = []
        assert wait_until(lambda: _poll_into(consumer, records) >= expected, timeout=timeout, interval=0.05), (
            f"{len(records)} of {expected} records on {topic}"
        )
        _poll_into(consumer, records)  # anything beyond the expected (duplicates) shows up here
        return records
    finally:
        consumer.close()


def _poll_into(consumer: KafkaConsumer, records: list) -> int:
    for batch in consumer.poll(timeout_ms=300).values():
        records.extend(batch)
    return len(records)


def _end_offsets(bootstrap: str, parts: list[TopicPartition], timeout: float = 10.0) -> dict[TopicPartition, int]:
    """High watermarks as fetch responses report them.

    Not ``KafkaConsumer.end_offsets``: the embedded Tansu broker answers ListOffsets
    (latest) with the offset after the last record *batch*'s base offset (e.g. 1 for a
    partition holding one batch of 7 records), not the high watermark.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=100, max_partition_fetch_bytes=1024)
    try:
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        assert wait_until(lambda: consumer.poll(timeout_ms=100) is not None and all(
            consumer.highwater(tp) is not None for tp in parts), timeout=timeout, interval=0)
        return {tp: consumer.highwater(tp) for tp in parts}
    finally:
        consumer.close()


def _group_progress(bootstrap: str, group: str, topic: str, partitions: int) -> tuple[dict, dict]:
    """(committed offset, end offset) per partition number of ``topic``."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        ends = _end_offsets(bootstrap, parts)
        committed = admin.list_group_offsets({group: parts})[group]  # kafka-python 3: list_consumer_group_offsets is gone
        return (
            {tp.partition: committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0 for tp in parts},
            {tp.partition: ends[tp] for tp in parts},
        )
    finally:
        admin.close()


def _stored_ids(client, table: str, org: str) -> set[str]:
    rows = client.query(f"SELECT id FROM {table} FINAL WHERE organisation_id = {{o:String}}", parameters={"o": org}).result_rows
    return {r[0] for r in rows}


def test_malformed_events_are_dead_lettered_and_good_ones_stored(small_event_ingest, broker, warehouse, org):
    s = small_event_ingest.settings
    rng = random.Random(f"{org}:dead-letter")  # ids of its own: the check below looks at every organisation
    producer = make_producer(broker.bootstrap)
    good_logs: list[dict] = []
    good_feedback_ids: set[str] = set()
    pending: list[tuple[Case | None, str, Any]] = []
    try:
        for topic, corpus, make_good, good_ids in (
            # the corpus too: its ids drawn from this test's own seeds, not from ones other tests may also use
            (s.topic_gateway_logs, gateway_corpus(org, seed=f"{org}:gateway"), lambda: gateway_log(org, rng=rng), None),
            (s.topic_feedback, feedback_corpus(org, seed=f"{org}:feedback"), lambda: good_feedback(org, rng), good_feedback_ids),
        ):
            for case in [*corpus, None]:  # None: the good events after the last bad one
                for _ in range(3):
                    ev = make_good()
                    if good_ids is None:
                        good_logs.append(ev)
                    else:
                        good_ids.add(ev["id"])
                    pending.append((None, topic, producer.send(topic, _dumps(ev))))
                if case is not None:
                    pending.append((case, topic, producer.send(topic, value=case.value, key=case.key)))
        producer.flush()
        produced: list[Produced] = []
        produced_ends: dict[tuple[str, int], int] = {}
        for case, topic, future in pending:
            md = future.get(timeout=30)
            assert md.topic == topic
            produced_ends[(topic, md.partition)] = max(produced_ends.get((topic, md.partition), 0), md.offset + 1)
            if case is not None:
                produced.append(Produced(case, topic, md.partition, md.offset))
    finally:
        producer.close()

    good_log_ids = {ev["_id"] for ev in good_logs}
    assert len(produced) >= 35
    assert wait_until(lambda: _stored_ids(warehouse, "generations", org) == good_log_ids, timeout=90)
    assert wait_until(lambda: _stored_ids(warehouse, "feedback", org) == good_feedback_ids, timeout=30)

    records = _read_topic(broker.bootstrap, s.topic_dead_letter, s.topic_partitions, expected=len(produced))

    # exactly one dead letter per bad message, matched by its source coordinates
    by_source: dict[tuple[str, int, int], list] = {}
    for r in records:
        h = {k: v for k, v in r.headers}
        by_source.setdefault(
            (h["tollgate.source.topic"].decode(), int(h["tollgate.source.partition"]), int(h["tollgate.source.offset"])), []
        ).append(r)
    expected = {(p.topic, p.partition, p.offset): p for p in produced}
    assert set(by_source) == set(expected), (
        f"missing: {[expected[k].case.label for k in set(expected) - set(by_source)]}; "
        f"unexpected: {sorted(set(by_source) - set(expected))}"
    )
    duplicated = [expected[k].case.label for k, rs in by_source.items() if len(rs) != 1]
    assert not duplicated, f"dead-lettered more than once: {duplicated}"

    for source, p in expected.items():
        (r,) = by_source[source]
        h = {k: v for k, v in r.headers}
        reason = h["tollgate.reason"].decode()
        _assert_reason(reason, p.case)
        assert r.key == p.case.key, p.case.label
        if h.get("tollgate.truncated") == b"true":
            assert p.case.label == "oversized", p.case.label
            assert r.value == p.case.value[:TRUNCATE_TO]
        else:
            assert "tollgate.truncated" not in h
            if p.case.value is None:
                assert r.value is None, p.case.label
            else:
                assert r.value == p.case.value, p.case.label

    # none of the bad events is stored, under this org or any other
    for table, topic in (("generations", s.topic_gateway_logs), ("feedback", s.topic_feedback)):
        bad_ids = sorted({str(p.case.log_id) for p in produced if p.case.log_id and p.topic == topic} - good_log_ids - good_feedback_ids)
        leaked = warehouse.query(f"SELECT id FROM {table} WHERE id IN {{ids:Array(String)}}", parameters={"ids": bad_ids}).result_rows
        assert not leaked, (table, leaked)

    # the workers went past every bad message: committed offsets reach the end of every partition
    for topic, group in small_event_ingest.groups.items():
        produced_end = {p: 0 for p in range(s.topic_partitions)}
        for (t, p), end in produced_ends.items():
            if t == topic:
                produced_end[p] = end
        seen: list[tuple[dict, dict]] = []

        def caught_up() -> bool:
            seen.append(_group_progress(broker.bootstrap, group, topic, s.topic_partitions))
            return seen[-1][0] == seen[-1][1]

        assert wait_until(caught_up, timeout=30), (topic, group, "committed, end:", seen[-1])
        assert seen[-1][1] == produced_end, (topic, "end offsets", seen[-1][1], "produced", produced_end)
