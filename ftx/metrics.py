"""Task metrics: the scores of generated completions against their references
(``data.task_metric``), which also serve as rewards (``objective.reward_functions``).

One registry, :data:`TASK_METRICS`, read by the config checks, the evaluation and
the policy-gradient rewards alike; a metric added there is available to all three.
Plain Python: no torch.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig


def json_fields(prediction: str, reference: str) -> float:
    """Share of the reference object's fields reproduced exactly; 0 if the
    prediction is not a JSON object. Partial credit shows progress a strict
    exact match would hide."""
    expected = json.loads(reference)
    try:
        predicted = json.loads(prediction)
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(predicted, dict):
        return 0.0
    return sum(predicted.get(key) == value for key, value in expected.items()) / len(expected)


def exact_match(prediction: str, reference: str) -> float:
    """1 when the completion equals the reference, ignoring surrounding whitespace."""
    return float(prediction.strip() == reference.strip())


def contains(prediction: str, reference: str) -> float:
    """1 when the reference occurs in the completion."""
    return float(reference.strip() in prediction)


def json_valid(prediction: str, reference: str) -> float:
    """1 when the completion parses as JSON, whatever it says."""
    try:
        json.loads(prediction)
    except json.JSONDecodeError:
        return 0.0
    return 1.0


def regex_match(prediction: str, reference: str, pattern: str) -> float:
    """1 when the whole completion (stripped) matches ``pattern``."""
    return float(re.fullmatch(pattern, prediction.strip(), flags=re.DOTALL) is not None)


def json_schema_match(prediction: str, reference: str, schema: dict) -> float:
    """1 when the completion is JSON that validates against ``schema``."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(prediction), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return 0.0
    return 1.0


TASK_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "json_valid": json_valid,
    "json_fields": json_fields,
}
"""The (prediction, reference) -> score metrics, by name: ``data.task_metric`` and,
each scored against the prompt's reference, ``objective.reward_functions``."""

SETTINGS: dict[str, tuple[str, str]] = {
    "regex": ("data.regex", "'\\d+'"),
    "json_schema": ("data.json_schema", "/path/to/schema.json"),
}
"""Task metrics that need a setting: the key that holds it and an example value."""


def resolve_metric(data: DictConfig) -> Callable[[str, str], float]:
    """The (prediction, reference) -> score function named by ``data.task_metric``."""
    name = data.task_metric
    if name in TASK_METRICS:
        return TASK_METRICS[name]
    if name == "regex":
        return functools.partial(regex_match, pattern=data.regex)
    if name == "json_schema":
        return functools.partial(json_schema_match, schema=json.loads(Path(data.json_schema).read_text()))
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)
