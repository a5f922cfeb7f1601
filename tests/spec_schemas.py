"""The bundled Portkey API spec for tests: its schemas with `$ref`s resolved, and a strict validator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_PATH = Path(__file__).resolve().parents[1] / "spec" / "portkey-api-subset.yaml"
SPEC: dict = yaml.safe_load(SPEC_PATH.read_text())

# JSON Schema's integer accepts 3.0 and True; the API must send real integers.
STRICT = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    type_checker=jsonschema.Draft7Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool)),
)


def resolve(node: Any) -> Any:
    """``node`` with every ``$ref`` replaced by what it points to in the spec."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = SPEC
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return resolve(target)
        return {k: resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v) for v in node]
    return node
