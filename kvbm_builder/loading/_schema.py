"""A JSON Schema (draft 2020-12) of the dict form, for editors: completion, descriptions, unknown keys flagged.

It is generated from the config fields themselves (each field's doc, default and rule facets) and the loader's
views of them, so it cannot drift from what :func:`~kvbm_builder.loading.load` accepts. It is looser than the
loader where JSON Schema cannot say a rule (a power of two, a byte budget that must hold one block); the loader
remains the judge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import attrs

from ..config.allocators import ALLOCATOR_OF_KIND
from ..config.consolidator import KvEventConsolidatorConfig
from ..config.fields import KEY, Spec, spec_of
from ..config.manager import KvBlockManagerConfig
from ..config.model import KvManagerModelConfig
from ..config.names import name_pattern
from ..config.protocols import Tier
from ..config.runtime import KvManagerRuntimeConfig
from ..config.sizes import SIZE_PATTERN
from ._converter import CLASS_VIEWS, MANAGER_VIEW, TIER_VIEWS, View

__all__ = ["json_schema", "name_pattern"]

_NAMES = {KvManagerRuntimeConfig: "Runtime", KvManagerModelConfig: "Model", KvEventConsolidatorConfig: "Consolidator"}
_TIER_NAMES = {Tier.G1: "DeviceLayout", Tier.G2: "HostLayout", Tier.G3: "DiskLayout", None: "Layout"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}"}


def _closed(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A table that takes ``properties`` and no other key."""
    return {"type": "object", **more, "properties": properties, "additionalProperties": False}


# upstream's serialized form of a layout, as a table: {"LayerSeparate": {"outer_contiguous": b}} or
# {"FullyContiguous": null} (the names read as the string form's)
_LAYOUT_TABLE = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 1,
    "patternProperties": {
        name_pattern(("LayerSeparate",), "words"): {
            **_closed({"outer_contiguous": {"type": "boolean"}}),
            "required": ["outer_contiguous"],
        },
        name_pattern(("FullyContiguous",), "words"): {
            "anyOf": [{"type": "null"}, {"type": "object", "additionalProperties": False}]
        },
    },
    "additionalProperties": False,
}
_SIZE = {
    "description": "A byte budget instead of num_blocks: '16GiB' (2^30), '16GB' (10^9) or a byte count; "
    "blocks = floor(size / bytes per block, alignment padding included).",
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}],
}


def _facets(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A rule's facets as JSON Schema: a config class becomes a reference, names a pattern."""
    if "class" in schema:
        return _ref(_NAMES.get(schema["class"], schema["class"].__name__))
    if "anyOf" in schema:
        return {**schema, "anyOf": [_facets(part) for part in schema["anyOf"]]}
    if "names" not in schema:
        return dict(schema)
    words, style = schema["names"]
    out = {"type": "string", "pattern": name_pattern(words, style), "examples": list(words)}
    if words[0] == "FullyContiguous":
        out = {"anyOf": [out, _LAYOUT_TABLE]}
    return {"anyOf": [out, {"type": "null"}]} if schema["nullable"] else out


def _table(view: View, doc: str, **properties: Any) -> dict[str, Any]:
    """The table of ``view``, after the ``properties`` given: each key described by its field (``size``, a key of
    the document's own, by :data:`_SIZE`)."""
    fields = attrs.fields_dict(cast(Any, view.target))
    for key in view.keys:
        if key not in fields:
            properties[key] = _SIZE
            continue
        spec: Spec = fields[key].metadata[KEY]
        properties[key] = {"description": spec.doc, **(_facets(spec.rule.schema) if spec.rule is not None else {})}
        if type(fields[key].default) in (int, bool, str):
            properties[key]["default"] = fields[key].default
    required = [key for key in view.keys if key in view.required and key != "num_blocks"]
    return _closed(properties, description=doc, **({"required": required} if required else {}))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a :class:`~kvbm_builder.KvBlockManagerConfig` document."""
    defs = {"KvBlockManagerConfig": _table(MANAGER_VIEW, cast(str, KvBlockManagerConfig.__doc__))}
    manager = defs["KvBlockManagerConfig"]["properties"]
    for cls, name in _NAMES.items():
        doc = spec_of(KvBlockManagerConfig, "model").doc if cls is KvManagerModelConfig else cls.__doc__
        defs[name] = _table(CLASS_VIEWS[cls], doc or "")
    for tier, view in TIER_VIEWS.items():
        if tier is not None:
            manager[tier.slot]["anyOf"] = [_ref(_TIER_NAMES[tier]), {"type": "null"}]
        # an allocator table may leave out its kind where it is the tier's own
        choices = [
            _ref(cls.__name__)
            if tier is not None and kind is tier.default_kind
            else {**_ref(cls.__name__), "required": ["kind"]}
            for kind, cls in ALLOCATOR_OF_KIND.items()
            if tier is None or kind in tier.accepts
        ]
        table = _table(
            view, f"{tier.words if tier else 'A tier'}: how many blocks, in what layout, backed by what memory."
        )
        table["properties"]["allocator"] = {
            "description": "How this tier's memory is made.",
            **(choices[0] if len(choices) == 1 else {"anyOf": choices}),
        }
        table["allOf"] = [
            {"oneOf": [{"required": ["num_blocks"]}, {"required": ["size"]}]},
            {"oneOf": [{"required": ["allocator"]}, {"required": ["logical"]}]},
        ]
        defs[_TIER_NAMES[tier]] = table
    for kind, cls in ALLOCATOR_OF_KIND.items():
        defs[cls.__name__] = _table(
            CLASS_VIEWS[cls],
            (cls.__doc__ or "").splitlines()[0],
            kind={
                "description": "Which allocator this table describes.",
                "type": "string",
                "pattern": name_pattern((kind.value,), "trim"),
                "examples": [kind.value],
            },
        )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kvbm-builder configuration",
        "$ref": "#/$defs/KvBlockManagerConfig",
        "$defs": defs,
    }
