"""Configurations from dicts, files and the environment, strictly; and back to plain data.

- :func:`load` / :func:`dump`: the dict form (JSON, TOML and YAML documents hold it); ``load(dump(c)) == c``;
- :func:`load_file`: a ``.json``, ``.toml``, ``.yaml`` or ``.yml`` file (YAML needs ``kvbm-builder[yaml]``);
- :func:`from_env`: the ``DYN_KVBM_*`` variables applied to a document or a built config;
- :func:`resolve`: defaults < file < environment < explicit arguments, remembering where each value came from;
- :func:`settings_from_env`: the variables that set :class:`~kvbm_builder.config.KvbmSettings`;
- :func:`cache_sizes_from_env`: the tier sizes the variables ask for, by the one size rule;
- :func:`json_schema`: a JSON Schema of the dict form, for editors; :func:`to_toml`: the dict form as TOML.

Every problem of one load is reported in one :class:`~kvbm_builder.errors.ConfigError`, each with its path
(``$.model.num_layers: must be >= 1, got 0``); a file that cannot be read is a one-line
:class:`~kvbm_builder.errors.LoadError` naming it.
"""

from ..config.settings import KvbmSettings, settings_from_env
from ..documents import read_document, to_toml
from ._converter import budget_blocks, dump, load
from ._schema import json_schema
from ._sources import CacheSizes, Resolved, cache_sizes_from_env, from_env, load_file, resolve

__all__ = [
    "CacheSizes",
    "KvbmSettings",
    "Resolved",
    "budget_blocks",
    "cache_sizes_from_env",
    "dump",
    "from_env",
    "json_schema",
    "load",
    "load_file",
    "read_document",
    "resolve",
    "settings_from_env",
    "to_toml",
]
