"""Fuzz family "environments": ``DYN_KVBM_*`` variables set to text of every kind (counts written ``4.0`` or ``1e3``,
thousands of digits, signs, spaces, words, non-ASCII, paths) over drawn documents and over built configs, read by
``resolve``, ``from_env``, ``settings_from_env``, ``cache_sizes_from_env`` and ``should_bypass_cpu_cache``.

Every input must raise nothing but KvbmErrors with a path (``$env.<variable>`` or ``$.<path>``) and a short message,
in bounded time; ``should_bypass_cpu_cache`` never raises; and a built config changed by ``from_env`` must equal the
one ``resolve`` makes of its document with the same variables (one rule, two ways in).
"""

from __future__ import annotations

import random

from budget import fuzz
from hypothesis import given
from loader_cases import SEEDS, check_error, document, environ
from syscalls import watchdog

from kvbm_builder import KvbmError
from kvbm_builder.config import KvManagerModelConfig
from kvbm_builder.config.env import should_bypass_cpu_cache
from kvbm_builder.loading import cache_sizes_from_env, dump, from_env, load, resolve, settings_from_env


def outcome(call: object) -> object:
    """What ``call()`` gives, or the problems of the KvbmError it raises (checked)."""
    try:
        return call()  # type: ignore[operator]
    except KvbmError as err:
        check_error(err)
        return err


@fuzz()
@given(seed=SEEDS)
def test_environments_are_applied_or_refused_by_variable(seed: int) -> None:
    rng = random.Random(seed)
    env = environ(rng)
    made = document(rng, most_changes=1)
    with watchdog(60):
        assert should_bypass_cpu_cache(env) in (True, False)
        outcome(lambda: settings_from_env(env))
        model = KvManagerModelConfig(num_layers=rng.choice([1, 28]), outer_dim=2, page_size=16, inner_dim=1024)
        outcome(lambda: cache_sizes_from_env(model, env))
        resolved = outcome(lambda: resolve(made, environ=env))
        if not isinstance(resolved, KvbmError):
            assert all(isinstance(v, str) and v for v in resolved.sources.values())  # every value has a source
            assert load(dump(resolved.config)) == resolved.config
        base = outcome(lambda: load(made))
        if isinstance(base, KvbmError):
            return
        changed = outcome(lambda: from_env(env, base))
        again = outcome(lambda: resolve(dump(base), environ=env).config)
        if isinstance(changed, KvbmError) or isinstance(again, KvbmError):
            assert isinstance(changed, KvbmError) and isinstance(again, KvbmError), (changed, again)
        else:
            assert changed == again
