"""A JSON Schema (draft 2020-12) of the dict form, for editors: completion, descriptions, unknown keys flagged.

It is generated from the config fields themselves (each field's doc, default and rule facets) and the loader's
views of them, so it cannot drift from what :func:`~kvbm_builder.loading.load` accepts. It is looser than the
loader where JSON Schema cannot say a rule (a power of two, a byte budget that must hold one block); the loader
remains the judge.
"""

from __future__ import annotations

import re
from typing import Any, cast

import attrs

from ..config.allocators import BUILTIN_ALLOCATORS
from ..config.consolidator import KvEventConsolidatorConfig
from ..config.fields import KEY, Spec
from ..config.manager import KvBlockManagerConfig
from ..config.model import KvManagerModelConfig
from ..config.names import SPACE_CLASS
from ..config.protocols import Tier
from ..config.runtime import KvManagerRuntimeConfig
from ..config.sizes import SIZE_PATTERN
from ._converter import CLASS_VIEWS, MANAGER_VIEW, TIER_VIEWS, View

__all__ = ["json_schema", "name_pattern"]

_NAMES = {KvManagerRuntimeConfig: "Runtime", KvManagerModelConfig: "Model", KvEventConsolidatorConfig: "Consolidator"}
_TIER_NAMES = {Tier.G1: "DeviceLayout", Tier.G2: "HostLayout", Tier.G3: "DiskLayout", None: "Layout"}


def _letter(ch: str, style: str) -> str:
    if ch.isalpha():
        return f"[{ch.lower()}{ch.upper()}]"
    return "[-_]" if style == "trim-dash" and ch in "-_" else re.escape(ch)


def name_pattern(words: tuple[str, ...], style: str) -> str:
    """A regular expression (ECMA-262 and Python alike) matching the spellings a parser of that style accepts:
    ``words`` ignores case, ``_`` and ``-`` anywhere; ``trim`` ignores case and surrounding spaces; ``trim-dash``
    also reads ``_`` as ``-``."""
    if style == "words":
        stems = ["[-_]*".join(_letter(ch, style) for ch in word if ch not in "-_") for word in words]
        return f"^[-_]*({'|'.join(stems)})[-_]*$"
    stems = ["".join(_letter(ch, style) for ch in word) for word in words]
    return f"^{SPACE_CLASS}*({'|'.join(stems)}){SPACE_CLASS}*$"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}"}


# upstream's serialized form of a layout, as a table: {"LayerSeparate": {"outer_contiguous": b}} or
# {"FullyContiguous": null} (the names read as the string form's)
_LAYOUT_TABLE = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 1,
    "patternProperties": {
        name_pattern(("LayerSeparate",), "words"): {
            "type": "object",
            "properties": {"outer_contiguous": {"type": "boolean"}},
            "required": ["outer_contiguous"],
            "additionalProperties": False,
        },
        name_pattern(("FullyContiguous",), "words"): {
            "anyOf": [{"type": "null"}, {"type": "object", "additionalProperties": False}]
        },
    },
    "additionalProperties": False,
}


def _facets(schema: dict[str, Any]) -> dict[str, Any]:
    """A rule's facets as JSON Schema: names become a pattern, a config class a reference."""
    out = dict(schema)
    names = out.pop("names", None)
    nullable = out.pop("nullable", False)
    if names is not None:
        out = {"type": "string", "pattern": name_pattern(*names), "examples": list(names[0])}
        if names[0][0] == "FullyContiguous":
            out = {"anyOf": [out, _LAYOUT_TABLE]}
    cls = out.pop("class", None)
    if cls is not None:
        out = _ref(_NAMES.get(cls, cls.__name__))
    if "anyOf" in out:
        out["anyOf"] = [_facets(part) for part in out["anyOf"]]
    return {"anyOf": [out, {"type": "null"}]} if nullable else out


def _table(view: View, doc: str, kind: str | None = None) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if kind is not None:
        properties["kind"] = {
            "description": "Which allocator this table describes.",
            "type": "string",
            "pattern": name_pattern((kind,), "trim"),
            "examples": [kind],
        }
    fields = attrs.fields_dict(cast(Any, view.target))
    for key in view.keys:
        field = fields.get(key)
        if field is None:  # `size`: a document's own key
            properties[key] = {
                "description": "A byte budget instead of num_blocks: '16GiB' (2^30), '16GB' (10^9) or a byte count; "
                "blocks = floor(size / bytes per block, alignment padding included).",
                "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}],
            }
            continue
        spec: Spec = field.metadata[KEY]
        schema = _facets(dict(spec.rule.schema)) if spec.rule is not None else {}
        default = field.default
        if default is not None and default is not attrs.NOTHING and type(default) in (int, bool, str):
            schema["default"] = default
        properties[key] = {"description": spec.doc, **schema}
    required = [k for k in view.keys if k in fields and fields[k].default is attrs.NOTHING and k != "num_blocks"]
    out: dict[str, Any] = {"type": "object", "description": doc, "properties": properties}
    if required:
        out["required"] = required
    out["additionalProperties"] = False
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a :class:`~kvbm_builder.KvBlockManagerConfig` document."""
    manager_fields = attrs.fields_dict(KvBlockManagerConfig)
    defs: dict[str, Any] = {"KvBlockManagerConfig": _table(MANAGER_VIEW, cast(str, KvBlockManagerConfig.__doc__))}
    manager = defs["KvBlockManagerConfig"]["properties"]
    for slot in Tier:
        manager[slot.slot] = {
            "description": manager[slot.slot]["description"],
            "anyOf": [_ref(_TIER_NAMES[slot]), {"type": "null"}],
        }
    for cls, name in _NAMES.items():
        defs[name] = _table(
            CLASS_VIEWS[cls],
            manager_fields["model"].metadata[KEY].doc if cls is KvManagerModelConfig else (cls.__doc__ or ""),
        )
    for tier, view in TIER_VIEWS.items():
        table = _table(
            view, f"{tier.words if tier else 'A tier'}: how many blocks, in what layout, backed by what memory."
        )
        kinds = {cast(Any, c).storage_kind: c.__name__ for c in BUILTIN_ALLOCATORS}
        accepted = [(k, name) for k, name in kinds.items() if tier is None or k in tier.accepts]
        choices = [
            _ref(name) if tier is not None and k is tier.default_kind else {**_ref(name), "required": ["kind"]}
            for k, name in accepted
        ]
        table["properties"]["allocator"] = {
            "description": "How this tier's memory is made.",
            **(choices[0] if len(choices) == 1 else {"anyOf": choices}),
        }
        table["allOf"] = [
            {"oneOf": [{"required": ["num_blocks"]}, {"required": ["size"]}]},
            {"oneOf": [{"required": ["allocator"]}, {"required": ["logical"]}]},
        ]
        defs[_TIER_NAMES[tier]] = table
    for cls in BUILTIN_ALLOCATORS:
        defs[cls.__name__] = _table(CLASS_VIEWS[cls], (cls.__doc__ or "").splitlines()[0], cls.storage_kind.value)  # type: ignore[attr-defined]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kvbm-builder configuration",
        "$ref": "#/$defs/KvBlockManagerConfig",
        "$defs": defs,
    }
