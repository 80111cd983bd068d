"""One exception tree rooted in KvbmError; configuration problems are data with paths."""

from __future__ import annotations

import pickle

import pytest

import kvbm_builder
from kvbm_builder import (
    AllocationError,
    BuilderConsumedError,
    ConfigError,
    DiskStorageError,
    GpuUnavailableError,
    KvBlockManagerConfig,
    KvbmError,
    KvManagerModelConfig,
    LayoutError,
    LoadError,
    NixlError,
    Problem,
    UninitializedFieldError,
)


def test_every_error_is_a_kvbm_error_and_the_builtin_it_resembles() -> None:
    assert issubclass(ConfigError, KvbmError) and issubclass(ConfigError, ValueError)
    assert issubclass(UninitializedFieldError, ConfigError)
    assert issubclass(LoadError, ConfigError)
    assert issubclass(BuilderConsumedError, KvbmError) and issubclass(BuilderConsumedError, RuntimeError)
    assert issubclass(LayoutError, KvbmError) and issubclass(LayoutError, ValueError)
    assert issubclass(AllocationError, KvbmError) and issubclass(AllocationError, RuntimeError)
    assert issubclass(GpuUnavailableError, AllocationError)
    assert issubclass(DiskStorageError, AllocationError)
    assert issubclass(NixlError, KvbmError) and issubclass(NixlError, RuntimeError)


def test_every_public_error_class_is_exported_from_the_package() -> None:
    errors = {name for name in kvbm_builder.__all__ if name.endswith("Error")}

    assert errors == {
        "AllocationError",
        "BuilderConsumedError",
        "ConfigError",
        "DiskStorageError",
        "GpuUnavailableError",
        "KvbmError",
        "LayoutError",
        "LoadError",
        "NixlError",
        "RuntimeObjectError",
        "UninitializedFieldError",
        "UsageError",
    }


class TestConfigError:
    def test_errors_render_each_path_under_the_root(self) -> None:
        err = ConfigError(
            [Problem(("host_layout", "num_blocks"), "must be >= 1, got 0"), Problem(("layouts", 2, "alignment"), "x")],
            "$",
        )

        assert err.errors == [("$.host_layout.num_blocks", "must be >= 1, got 0"), ("$.layouts[2].alignment", "x")]

    def test_without_a_root_the_path_starts_at_the_field(self) -> None:
        assert ConfigError([Problem(("runtime", "worker_id"), "m")]).errors == [("runtime.worker_id", "m")]
        assert ConfigError([Problem((), "m")], "model").errors == [("model", "m")]

    def test_one_problem_reads_as_one_line(self) -> None:
        assert str(ConfigError([Problem(("outer_dim",), "must be 1 or 2, got 3")], "model")) == (
            "model.outer_dim: must be 1 or 2, got 3"
        )

    def test_several_problems_are_counted_and_listed(self) -> None:
        err = ConfigError([Problem(("a",), "first"), Problem(("b",), "second")], "m")

        assert str(err) == "2 problems in the configuration:\n  m.a: first\n  m.b: second"

    def test_a_problem_can_be_moved_under_a_parent(self) -> None:
        assert Problem(("num_blocks",), "m").under("host_layout") == Problem(("host_layout", "num_blocks"), "m")

    def test_rerooted_shows_the_same_problems_elsewhere(self) -> None:
        err = ConfigError([Problem(("num_blocks",), "must be >= 1, got 0")], "layout")

        moved = err.rerooted("$", "host_layout")

        assert type(moved) is ConfigError
        assert moved.errors == [("$.host_layout.num_blocks", "must be >= 1, got 0")]

    def test_it_survives_pickling(self) -> None:
        # e.g. when raised in a worker process
        err = ConfigError([Problem(("outer_dim",), "must be 1 or 2, got 3")], "model")

        again = pickle.loads(pickle.dumps(err))

        assert type(again) is ConfigError
        assert again.errors == err.errors
        assert str(again) == str(err)


class TestUninitializedFieldError:
    def test_str_is_exactly_upstreams(self) -> None:
        err = UninitializedFieldError(
            [Problem(("worker_id",), "must be initialized")], "runtime", missing=["worker_id"]
        )

        assert str(err) == "`worker_id` must be initialized"

    def test_rerooted_keeps_the_missing_fields(self) -> None:
        err = UninitializedFieldError([Problem(("model",), "must be initialized")], "", missing=["model"])

        moved = err.rerooted("$")

        assert type(moved) is UninitializedFieldError
        assert moved.missing == ("model",)
        assert moved.errors == [("$.model", "must be initialized")]

    def test_it_survives_pickling(self) -> None:
        with pytest.raises(UninitializedFieldError) as caught:
            KvBlockManagerConfig.builder().build()

        again = pickle.loads(pickle.dumps(caught.value))

        assert type(again) is UninitializedFieldError
        assert again.missing == ("runtime", "model")
        assert str(again) == str(caught.value)
        assert str(again).splitlines()[0] == "`runtime` must be initialized"


def test_a_problem_found_by_build_names_its_field() -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerModelConfig.builder().num_layers(-1).outer_dim(2).page_size(16).inner_dim(8).build()

    (problem,) = caught.value.problems
    assert problem == Problem(("num_layers",), "must be >= 1, got -1")
    assert caught.value.root == "model"


def test_every_exception_and_warning_class_of_the_package_lives_in_errors() -> None:
    # one tree, one module: a class moved there stays importable where it was (e.g. kvbm_builder.storage)
    import importlib
    import pkgutil

    found = []
    for info in pkgutil.walk_packages(kvbm_builder.__path__, "kvbm_builder."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]) or info.name.endswith("__main__"):
            continue  # private modules' own control flow (it never reaches a caller) is theirs
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            raised = (
                isinstance(value, type) and issubclass(value, (BaseException, Warning)) and not name.startswith("_")
            )
            if raised and value.__module__.startswith("kvbm_builder") and value.__module__ != "kvbm_builder.errors":
                found.append(f"{value.__module__}.{name}")
    assert found == []
