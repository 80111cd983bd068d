"""Fuzz family "documents": configuration files as JSON, TOML or YAML text (valid ones, near misses, values of
thousands of digits or a thousand levels deep, look-alike spellings, nested YAML aliases and merges, tags, duplicate
keys, cut or corrupted bytes), read by ``load_file`` and ``resolve(read_document(...))``; and the same documents as
data, given to ``load`` directly.

Every input must raise nothing but KvbmErrors, each with a path and a short message (a file that cannot be read: one
line naming it), finish in bounded time (a watchdog), and leave no descriptor or file behind. A document the loader
accepts must satisfy the JSON Schema (which is never stricter than the loader), and its config must survive
``dump`` and ``load`` unchanged and show itself with ``repr``.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from budget import fuzz
from hypothesis import given
from loader_cases import SEEDS, check_error, document, document_text, nothing_left
from syscalls import watchdog

from kvbm_builder import KvbmError
from kvbm_builder.loading import dump, json_schema, load, load_file, read_document, resolve

SCHEMA = jsonschema.Draft202012Validator(json_schema())


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kvbm-fuzz-documents-") as base:
        yield Path(base)


def json_data(value: object) -> bool:
    """Whether ``value`` is what a JSON document can hold (string keys, finite numbers), so the schema can judge it."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and json_data(v) for k, v in value.items())
    if isinstance(value, list):
        return all(json_data(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def accepted(document: Any, config: Any) -> None:
    """What must hold of a document the loader accepted."""
    if json_data(document):
        assert not list(SCHEMA.iter_errors(document)), "the loader accepts what the JSON Schema refuses"
    assert load(json.loads(json.dumps(dump(config)))) == config
    assert repr(config)


@fuzz()
@given(seed=SEEDS)
def test_files_are_read_or_refused_with_a_path(work: Path, seed: int) -> None:
    suffix, data = document_text(random.Random(seed))
    path = work / f"config{suffix}"
    path.write_bytes(data)
    with watchdog(60), nothing_left(str(work)):
        for read in (load_file, lambda p: resolve(read_document(p), environ={}).config):
            try:
                config = read(path)
            except KvbmError as err:
                check_error(err)
            else:
                accepted(read_document(path), config)


@fuzz()
@given(seed=SEEDS)
def test_documents_as_data_are_loaded_or_refused_with_a_path(seed: int) -> None:
    made = document(random.Random(seed))
    with watchdog(60):
        try:
            config = load(made)
        except KvbmError as err:
            check_error(err)
        else:
            accepted(made, config)
