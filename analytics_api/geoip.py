"""Country of an IP address, for audit records: a MaxMind database, or nothing.

``TOLLGATE_GEOIP_DB`` names a MaxMind GeoLite2/GeoIP2 Country or City ``.mmdb``
file (download it from MaxMind under their licence; Tollgate ships none). Unset,
every lookup answers "". Anything that has ``country(ip) -> str`` (an ISO 3166
alpha-2 code, or "" when unknown) can stand in for the reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class CountryLookup(Protocol):
    def country(self, ip: str) -> str: ...


class NoCountry:
    def country(self, ip: str) -> str:
        return ""


class MaxMindCountry:
    def __init__(self, path: Path):
        import maxminddb

        self.reader = maxminddb.open_database(str(path))  # FileNotFoundError / InvalidDatabaseError at start-up

    def country(self, ip: str) -> str:
        try:
            record = self.reader.get(ip)
        except ValueError:  # not an IP address (e.g. a test client's name)
            return ""
        if not isinstance(record, dict):
            return ""
        for field in ("country", "registered_country"):
            code = (record.get(field) or {}).get("iso_code")
            if code:
                return str(code)
        return ""


def country_lookup(path: Path | None) -> CountryLookup:
    return MaxMindCountry(path) if path else NoCountry()
