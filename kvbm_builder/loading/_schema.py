"""A JSON Schema (draft 2020-12) of the dict form, for editors: completion, descriptions, unknown keys flagged.

It is generated from the same tables the converter structures (``FORMS``), so it cannot drift from what
:func:`~kvbm_builder.loading.load` accepts. The schema is looser than the loader where JSON Schema cannot say a rule
(a power of two, case-insensitive names, a byte budget that must hold one block); the loader remains the judge.
"""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

import attrs

from ..config.allocators import PinningMode
from ..config.consolidator import ConsolidatorMode, EventSource
from ..config.layout import BlockParallelismStrategy, LayoutType
from ..config.runtime import NixlOptions
from ._converter import FORMS, LAYOUTS, SLOTS, ByteSize, Form

__all__ = ["NAMES", "SIZE_PATTERN", "json_schema", "name_pattern"]

SIZE_PATTERN = r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*([kKmMgGtT][iI]?[bB]|[bB])?\s*$"

# The names each type's parser accepts, and how it reads them: "words" ignores case, `_` and `-` anywhere (layouts,
# upstream's rule); "trim" ignores case and surrounding spaces; "trim-dash" also reads `_` as `-`.
NAMES: dict[object, tuple[tuple[str, ...], str]] = {
    LayoutType: (("FullyContiguous", "LayerSeparateOuterContiguous", "LayerSeparateBlockContiguous"), "words"),
    PinningMode: (("register", "host_alloc"), "words"),
    BlockParallelismStrategy: (("LeaderWorkerSharded",), "words"),
    NixlOptions: (("enabled", "disabled"), "trim"),
    ConsolidatorMode: (("dedup", "passthrough"), "trim"),
    EventSource: (("vllm", "gpu", "trtllm", "tensorrt-llm"), "trim-dash"),  # kvbm: never valid in a document
}


def _letter(ch: str, style: str) -> str:
    if ch.isalpha():
        return f"[{ch.lower()}{ch.upper()}]"
    return "[-_]" if style == "trim-dash" and ch in "-_" else re.escape(ch)


def name_pattern(words: tuple[str, ...], style: str) -> str:
    """A regular expression (ECMA-262 and Python alike) matching the spellings a parser of that style accepts."""
    if style == "words":
        stems = ["[-_]*".join(_letter(ch, style) for ch in word if ch not in "-_") for word in words]
        return f"^[-_]*({'|'.join(stems)})[-_]*$"
    stems = ["".join(_letter(ch, style) for ch in word) for word in words]
    return f"^\\s*({'|'.join(stems)})\\s*$"


def _names(t: object) -> dict[str, Any]:
    words, style = NAMES[t]
    return {"type": "string", "pattern": name_pattern(words, style), "examples": list(words)}


def _ref(form: Form) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{form.name}"}


def _type_schema(t: Any) -> dict[str, Any]:
    by_target = {form.target: form for form in FORMS if form.target is not LAYOUTS[None].target}
    by_section = {form.section: form for form in LAYOUTS.values()}
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        inner = _type_schema(args[0])
        return {"anyOf": [inner, {"type": "null"}]} if len(args) == 1 else {"anyOf": [_type_schema(a) for a in args]}
    if t is bool:
        return {"type": "boolean"}
    if t is int:
        return {"type": "integer"}
    if t is str:
        return {"type": "string"}
    if t is ByteSize:
        return {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}]}
    if t is LayoutType:
        return {
            "anyOf": [
                _names(LayoutType),
                {
                    "type": "object",
                    "properties": {
                        "LayerSeparate": {
                            "type": "object",
                            "properties": {"outer_contiguous": {"type": "boolean"}},
                            "required": ["outer_contiguous"],
                            "additionalProperties": False,
                        }
                    },
                    "required": ["LayerSeparate"],
                    "additionalProperties": False,
                },
            ]
        }
    if t in NAMES:
        return _names(t)
    if t in SLOTS:
        slot = SLOTS[t]
        choices = [
            _ref(form) if form is slot.default else {**_ref(form), "required": ["kind"]} for form in slot.accepted
        ]
        return choices[0] if len(choices) == 1 else {"anyOf": choices}
    if t in by_section:
        return _ref(by_section[t])
    if t in by_target:
        return _ref(by_target[t])
    return {"type": "string"}


def _table_schema(form: Form) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if form.kind is not None:
        properties["kind"] = {
            "description": "Which allocator this table describes.",
            "type": "string",
            "pattern": name_pattern((form.kind,), "trim"),
            "examples": [form.kind],
        }
    for name, key in form.keys.items():
        facets = dict(key.schema)
        schema = {"enum": facets.pop("enum")} if "enum" in facets else _type_schema(key.type)
        if "minimum" in facets or "maximum" in facets:
            schema = {**schema, **{k: facets.pop(k) for k in ("minimum", "maximum") if k in facets}}
        properties[name] = {"description": key.doc, **schema, **facets}
    fields = {f.name: f for f in attrs.fields(form.target)}
    required = [name for name in form.keys if name in fields and fields[name].default is attrs.NOTHING]
    out: dict[str, Any] = {"type": "object", "description": form.doc, "properties": properties}
    if form.target is LAYOUTS[None].target:
        required = [name for name in required if name != "num_blocks"]
        out["allOf"] = [
            {"oneOf": [{"required": ["num_blocks"]}, {"required": ["size"]}]},
            {"oneOf": [{"required": ["allocator"]}, {"required": ["logical"]}]},
        ]
    if required:
        out["required"] = required
    out["additionalProperties"] = False
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a :class:`~kvbm_builder.KvBlockManagerConfig` document."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kvbm-builder configuration",
        "$ref": f"#/$defs/{FORMS[0].name}",
        "$defs": {form.name: _table_schema(form) for form in FORMS},
    }
