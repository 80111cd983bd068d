"""Fuzz family "builder chains": every config builder driven by a drawn program of setter calls (with good values,
edge values, values of thousands of digits, and a caller's objects whose methods raise: ``__repr__``, ``__eq__``,
``__hash__``, ``__len__``, attribute lookups, comparisons of an int subclass), ``set(name, ...)``, ``clone()``,
``copy.copy``, ``repr``, ``is_set``, ``build()`` (and use after it), direct construction and ``attrs.evolve``.

Every input must raise nothing but KvbmErrors (a ConfigError with a path and a short message for each problem), and
a config that builds must hold plain values that pass their own rules, show itself with ``repr``, and come back equal
from ``load(dump(config))`` when a document can hold it.
"""

from __future__ import annotations

import copy
import inspect
import random
import warnings
from typing import Any

import attrs
from budget import fuzz
from hypothesis import given
from loader_cases import SEEDS, caller_value, check_error, spelling
from syscalls import watchdog

from kvbm_builder import KvbmError, RuntimeObjectError
from kvbm_builder.config import (
    CancellationToken,
    DeviceAllocator,
    DiskAllocator,
    KvBlockManagerConfig,
    KvEventConsolidatorConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    PinnedAllocator,
    SystemAllocator,
)
from kvbm_builder.config.fields import specs
from kvbm_builder.errors import RuntimeObjectWarning
from kvbm_builder.loading import dump, load
from kvbm_builder.loading._converter import LOADABLE

ALLOCATORS = (DeviceAllocator, PinnedAllocator, SystemAllocator, DiskAllocator)
BUILT = (KvManagerModelConfig, KvManagerLayoutConfig, KvManagerRuntimeConfig, KvEventConsolidatorConfig)
CONFIGS = (*BUILT, KvBlockManagerConfig)
NOT_SETTERS = {"build", "clone", "set", "is_set", "mark_invalid"}


def setters(cls: type) -> dict[str, int]:
    """A builder's setters and how many values each takes."""
    builder = cls.builder()  # type: ignore[attr-defined]
    return {
        name: len(inspect.signature(getattr(builder, name)).parameters)
        for name in dir(builder)
        if not name.startswith("_") and name not in NOT_SETTERS and callable(getattr(builder, name))
    }


SETTERS = {cls: setters(cls) for cls in CONFIGS}

GOOD: dict[str, list[object]] = {
    "num_layers": [1, 2, 32, 2**64 - 1],
    "outer_dim": [1, 2],
    "page_size": [1, 16, 2**20],
    "inner_dim": [1, 128, 2**40],
    "dtype_width_bytes": [1, 2, 4, 8],
    "num_blocks": [1, 4, 2**20, 2**40, 2**63 - 1],
    "alignment": [1, 2, 4096, 2**21, 2**63],
    "worker_id": [0, 7, 2**64 - 1],
    "allocator": [SystemAllocator(), DiskAllocator(directory="/nonexistent"), DeviceAllocator(), PinnedAllocator()],
    "logical": ["LeaderWorkerSharded"],
    "cancellation_token": [CancellationToken()],
    "engine_endpoint": ["tcp://localhost:5557", "ipc:///tmp/kv"],
    "output_endpoint": ["tcp://*:5558", None],
    "engine_source": ["vllm", "trtllm", "kvbm"],
}


def good_config(rng: random.Random, cls: type) -> object:
    """A valid config of ``cls`` (built from the good values), for the manager's tables."""
    if cls is KvManagerModelConfig:
        return KvManagerModelConfig(num_layers=rng.choice([1, 2]), outer_dim=2, page_size=4, inner_dim=8)
    if cls is KvManagerRuntimeConfig:
        return KvManagerRuntimeConfig.builder().worker_id(rng.choice([0, 2**64 - 1])).disable_nixl().build()
    allocator = rng.choice(GOOD["allocator"])
    return KvManagerLayoutConfig(num_blocks=rng.choice([1, 4, 2**40]), allocator=allocator)


STARTS: dict[type, dict[str, object]] = {
    KvManagerModelConfig: {"num_layers": 2, "outer_dim": 2, "page_size": 4, "inner_dim": 8},
    KvManagerLayoutConfig: {"num_blocks": 4, "allocator": SystemAllocator()},
    KvManagerRuntimeConfig: {"worker_id": 0},
    KvEventConsolidatorConfig: {},
    KvBlockManagerConfig: {
        "runtime": KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build(),
        "model": KvManagerModelConfig(num_layers=2, outer_dim=2, page_size=4, inner_dim=8),
        "host_layout": KvManagerLayoutConfig(num_blocks=4, allocator=SystemAllocator()),
    },
}


def value_for(rng: random.Random, name: str) -> object:
    roll = rng.random()
    if roll < 0.45 and name in GOOD:
        return rng.choice(GOOD[name])
    if roll < 0.7 and name in ("runtime", "model", "device_layout", "host_layout", "disk_layout"):
        cls = {"runtime": KvManagerRuntimeConfig, "model": KvManagerModelConfig}.get(name, KvManagerLayoutConfig)
        return good_config(rng, cls)
    if roll < 0.75:
        names = {"layout_type": ["FullyContiguous", "layer_separate_outer_contiguous"], "nixl": ["enabled"]}
        return spelling(rng, names.get(name, ["vllm", "register", "system"]))
    return caller_value(rng)


def check_built(config: Any) -> None:
    """What must hold of any config that was built."""
    cls = type(config)
    values = {f.name: getattr(config, f.name) for f in attrs.fields(cls)}
    assert cls.check_values(values) == [], "a built config breaks its own rules"
    for name, spec in specs(cls).items():
        value = values[name]
        if spec.rule is not None and spec.rule.plain:
            assert type(value) in (int, str, bool, type(None)), f"{name} kept a {type(value).__name__}"
    assert repr(config)
    assert copy.deepcopy(config) is config
    if cls in LOADABLE:
        try:
            with warnings.catch_warnings():  # a runtime object a caller attached is left out, with a warning
                warnings.simplefilter("ignore", RuntimeObjectWarning)
                data = dump(config)
        except RuntimeObjectError as err:
            check_error(err)
        else:
            assert load(data, cls) == config


def run_program(rng: random.Random) -> None:
    cls = rng.choice(CONFIGS)
    builder = cls.builder()  # type: ignore[attr-defined]
    if rng.random() < 0.6:  # most programs start from a config that would build, then change it
        for name, value in STARTS[cls].items():
            builder.set(name, value)
    for _ in range(rng.randrange(1, 8)):
        roll = rng.random()
        try:
            if roll < 0.7:
                name, arity = rng.choice(list(SETTERS[cls].items()))
                getattr(builder, name)(*(value_for(rng, name) for _ in range(arity)))
            elif roll < 0.75:
                builder.set(rng.choice([*SETTERS[cls], "unknown", "", "_values"]), caller_value(rng))
            elif roll < 0.8:
                builder = builder.clone() if rng.random() < 0.5 else copy.copy(builder)
            elif roll < 0.85:
                assert repr(builder)
                builder.is_set(rng.choice([*SETTERS[cls], "x"]))
            else:
                check_built(builder.build())
        except KvbmError as err:
            check_error(err)


def construct(rng: random.Random) -> None:
    """Direct construction and ``attrs.evolve``, which run the same rules as ``build()``."""
    cls = rng.choice([*CONFIGS, *ALLOCATORS])
    fields = attrs.fields(cls)
    names = [f.name for f in fields]
    chosen = {f.name for f in fields if f.default is attrs.NOTHING}  # Python's own TypeError without them
    chosen.update(rng.sample(names, rng.randrange(len(names) + 1)))
    kwargs = {name: value_for(rng, name) for name in chosen}
    try:
        made = cls(**kwargs)
    except KvbmError as err:
        check_error(err)
        return
    check_built(made)
    if not names:
        return
    name = rng.choice(names)
    try:
        check_built(attrs.evolve(made, **{name: value_for(rng, name)}))
    except KvbmError as err:
        check_error(err)


@fuzz()
@given(seed=SEEDS)
def test_builder_chains_build_or_say_what_is_wrong_by_path(seed: int) -> None:
    rng = random.Random(seed)
    with watchdog(60):
        run_program(rng)
        construct(rng)
