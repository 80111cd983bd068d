"""The DYN_KVBM_* sizing variables, should_bypass_cpu_cache, and byte sizes (GB = 10^9, GiB = 2^30)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from kvbm_builder import ConfigError, KvManagerModelConfig
from kvbm_builder.config import GB, GiB, parse_size, should_bypass_cpu_cache
from kvbm_builder.config.env import EnvVar
from kvbm_builder.config.sizes import format_bytes
from kvbm_builder.loading import CacheSizes, cache_sizes_from_env

CPU_GB = "DYN_KVBM_CPU_CACHE_GB"
CPU_BLOCKS = "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"
DISK_GB = "DYN_KVBM_DISK_CACHE_GB"
DISK_BLOCKS = "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"

MODEL = KvManagerModelConfig.builder().num_layers(28).outer_dim(2).page_size(16).inner_dim(1024).build()


class TestShouldBypassCpuCache:
    """G1 offloads straight to G3 when a disk tier is asked for and a CPU tier is not."""

    @pytest.mark.parametrize(
        ("environ", "bypass"),
        [
            ({}, False),
            ({DISK_GB: "100"}, True),
            ({DISK_BLOCKS: "5000"}, True),
            ({DISK_GB: "100", CPU_GB: "4"}, False),
            ({DISK_GB: "100", CPU_BLOCKS: "1000"}, False),
            ({CPU_GB: "4"}, False),
            ({DISK_GB: "100", CPU_GB: "0"}, True),  # zero counts as unset
            ({DISK_GB: "100", CPU_GB: ""}, True),  # so does empty
            ({DISK_GB: "100", CPU_GB: "lots"}, True),  # and unparsable, as upstream
            ({DISK_GB: "0", DISK_BLOCKS: "0"}, False),
            ({DISK_GB: "-5"}, False),
        ],
    )
    def test_the_rule(self, environ: dict[str, str], bypass: bool) -> None:
        assert should_bypass_cpu_cache(environ) is bypass

    def test_any_positive_number_counts_where_upstream_wants_an_integer(self) -> None:
        # upstream parses the GB variables as integers here (0.5 would be unset) but as floats when sizing;
        # one parser here: 0.5 GB is a disk tier both when sizing and when deciding to bypass
        assert should_bypass_cpu_cache({DISK_GB: "0.5"}) is True
        assert should_bypass_cpu_cache({DISK_GB: "100", CPU_GB: "0.5"}) is False

    def test_a_block_count_must_be_whole(self) -> None:
        assert should_bypass_cpu_cache({DISK_BLOCKS: "10.5"}) is False

    @pytest.mark.parametrize("text", ["10.0", "1e3", "18446744073709551616", " 10 "])
    def test_counts_are_read_as_upstreams_integer_parse_refuses_them(self, text: str) -> None:
        # upstream's `parse::<usize>()`: no fraction, no exponent, within u64, no spaces
        assert should_bypass_cpu_cache({DISK_BLOCKS: text}) is False
        assert should_bypass_cpu_cache({DISK_GB: "5", CPU_BLOCKS: text}) is True

    def test_a_signed_count_is_read_as_upstream_reads_it(self) -> None:
        assert should_bypass_cpu_cache({DISK_BLOCKS: "+10"}) is True

    def test_a_size_with_spaces_is_no_size(self) -> None:
        assert should_bypass_cpu_cache({DISK_GB: " 10 "}) is False

    def test_it_reads_the_process_environment_by_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (CPU_GB, CPU_BLOCKS, DISK_GB, DISK_BLOCKS):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(DISK_GB, "10")

        assert should_bypass_cpu_cache() is True


class TestCacheSizesFromEnv:
    def test_the_reference_example(self) -> None:
        # 28 layers, outer 2, page 16, inner 1024, 2 bytes = 1,835,008 bytes per block; 4 GB -> 2179 blocks
        assert cache_sizes_from_env(MODEL, {CPU_GB: "4"}) == CacheSizes(cpu_blocks=2179, disk_blocks=None)

    def test_decimal_gigabytes_truncated(self) -> None:
        sizes = cache_sizes_from_env(MODEL, {CPU_GB: "0.5", DISK_GB: "100"})

        assert sizes.cpu_blocks == 500_000_000 // 1_835_008 == 272
        assert sizes.disk_blocks == 100 * GB // 1_835_008 == 54_495

    def test_nothing_asked_for(self) -> None:
        assert cache_sizes_from_env(MODEL, {}) == CacheSizes(cpu_blocks=None, disk_blocks=None)
        assert cache_sizes_from_env(MODEL, {CPU_GB: "0", DISK_GB: " "}) == CacheSizes(None, None)

    def test_a_positive_override_wins(self) -> None:
        sizes = cache_sizes_from_env(MODEL, {CPU_GB: "4", CPU_BLOCKS: "1000", DISK_BLOCKS: "20000"})

        assert sizes == CacheSizes(cpu_blocks=1000, disk_blocks=20000)

    def test_a_zero_override_does_not(self) -> None:
        assert cache_sizes_from_env(MODEL, {CPU_GB: "4", CPU_BLOCKS: "0"}).cpu_blocks == 2179

    def test_exact_arithmetic_no_float_rounding(self) -> None:
        one_byte = (
            KvManagerModelConfig.builder().num_layers(1).outer_dim(1).page_size(1).inner_dim(1).dtype_width_bytes(1)
        ).build()
        # 1.001 GB is exactly 1,001,000,000 one-byte blocks; float(1.001) * 1e9 truncates to 1,000,999,999
        assert int(1.001 * 1e9) == 1_000_999_999
        assert cache_sizes_from_env(one_byte, {CPU_GB: "1.001"}).cpu_blocks == 1_001_000_000

    def test_it_reads_the_process_environment_by_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (CPU_GB, CPU_BLOCKS, DISK_GB, DISK_BLOCKS):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(CPU_GB, "4")

        assert cache_sizes_from_env(MODEL).cpu_blocks == 2179

    @pytest.mark.parametrize(
        ("environ", "path", "message"),
        [
            ({CPU_GB: "four"}, CPU_GB, "must be a non-negative number, such as 4 or 0.5, got 'four'"),
            ({CPU_GB: "4GB"}, CPU_GB, "must be a non-negative number, such as 4 or 0.5, got '4GB'"),
            ({CPU_GB: "-1"}, CPU_GB, "must be a non-negative number, such as 4 or 0.5, got '-1'"),
            ({DISK_BLOCKS: "1.5"}, DISK_BLOCKS, "must be a whole number of blocks, got '1.5'"),
            (
                {DISK_GB: "0.001"},
                DISK_GB,
                "1000000 bytes hold no whole block of 1835008 bytes; raise it, or give num_blocks "
                "(it sets $.disk_layout.size)",
            ),
        ],
    )
    def test_what_cannot_size_a_tier_names_the_variable(self, environ: dict[str, str], path: str, message: str) -> None:
        with pytest.raises(ConfigError) as caught:
            cache_sizes_from_env(MODEL, environ)

        assert caught.value.errors == [(f"$env.{path}", message)]

    def test_both_tiers_are_reported_together(self) -> None:
        with pytest.raises(ConfigError) as caught:
            cache_sizes_from_env(MODEL, {CPU_GB: "x", DISK_BLOCKS: "y"})

        assert [path for path, _ in caught.value.errors] == [f"$env.{CPU_GB}", f"$env.{DISK_BLOCKS}"]

    def test_absurd_numbers_are_refused_not_computed(self) -> None:
        # 1e999999999 would take minutes of exact arithmetic; 5000 digits would make int() raise ValueError
        for text in ("1e999999999", "9" * 5000):
            with pytest.raises(ConfigError, match=CPU_GB):
                cache_sizes_from_env(MODEL, {CPU_GB: text})


class TestEnvVar:
    """The one reading of every variable: counts as upstream's integer parse, amounts as decimal numbers."""

    PORT = EnvVar("DYN_KVBM_METRICS_PORT", "count", what="a port number 1..65535", zero_is_unset=False)
    BLOCKS = EnvVar(CPU_BLOCKS, "blocks")

    def test_a_count_of_blocks_by_default(self) -> None:
        with pytest.raises(ConfigError) as caught:
            self.BLOCKS.read({CPU_BLOCKS: "many"})

        assert caught.value.errors == [(f"$env.{CPU_BLOCKS}", "must be a whole number of blocks, got 'many'")]

    @pytest.mark.parametrize("text", ["http", "80.5", "-1"])
    def test_the_variable_says_what_is_wanted(self, text: str) -> None:
        with pytest.raises(ConfigError) as caught:
            self.PORT.read({self.PORT.name: text})

        assert caught.value.errors == [(f"$env.{self.PORT.name}", f"must be a port number 1..65535, got {text!r}")]

    def test_zero_is_unset_unless_the_variable_refuses_it(self) -> None:
        assert self.BLOCKS.read({CPU_BLOCKS: "0"}) is None
        assert self.PORT.read({self.PORT.name: "0"}) == 0  # the field's rule refuses it (see settings_from_env)

    def test_unset_and_empty_are_unset(self) -> None:
        for environ in ({}, {self.PORT.name: ""}, {self.PORT.name: "  "}):
            assert self.PORT.read(environ) is None
        assert self.PORT.read({self.PORT.name: "6881"}) == 6881

    @pytest.mark.parametrize(
        ("text", "count"),
        [("10", 10), ("+10", 10), ("0", None), ("18446744073709551615", 2**64 - 1)],
    )
    def test_counts_are_read_as_upstreams_integer_parse(self, text: str, count: int | None) -> None:
        assert self.BLOCKS.read({CPU_BLOCKS: text}) == count

    @pytest.mark.parametrize("text", ["10.0", "1e3", " 10 ", "10 ", "18446744073709551616", "-5", "0x10"])
    def test_what_upstreams_integer_parse_refuses_is_no_count(self, text: str) -> None:
        with pytest.raises(ConfigError, match="must be a whole number of blocks"):
            self.BLOCKS.read({CPU_BLOCKS: text})
        assert self.BLOCKS.read({CPU_BLOCKS: text}, strict=False) is None

    def test_amounts_are_decimal_numbers_without_spaces(self) -> None:
        gb = EnvVar(CPU_GB, "gigabytes")
        assert gb.read({CPU_GB: "0.5"}) == Fraction(1, 2)
        assert gb.read({CPU_GB: "+2"}) == 2
        for text in (" 10 ", "4GB", "-1"):
            with pytest.raises(ConfigError, match="must be a non-negative number"):
                gb.read({CPU_GB: text})


class TestParseSize:
    @pytest.mark.parametrize(
        ("text", "nbytes"),
        [
            ("16GiB", 16 * 2**30),
            ("16 GiB", 16 * 2**30),
            ("16gib", 16 * 2**30),
            ("16GB", 16 * 10**9),
            ("16 gb", 16 * 10**9),
            ("512MiB", 512 * 2**20),
            ("512MB", 512 * 10**6),
            ("4KiB", 4096),
            ("4kb", 4000),
            ("1TiB", 2**40),
            ("1TB", 10**12),
            ("0.5GB", 500_000_000),
            ("1.5GiB", 3 * 2**29),
            ("1e3", 1000),
            ("100B", 100),
            ("100", 100),
            (" 7 ", 7),
            (17179869184, 17179869184),
            (0, 0),
        ],
    )
    def test_sizes(self, text: object, nbytes: int) -> None:
        assert parse_size(text) == nbytes

    def test_gb_and_gib_are_never_mixed_up(self) -> None:
        assert (GB, GiB) == (10**9, 2**30)
        assert parse_size("1GB") == GB != parse_size("1GiB") == GiB

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("16G", "'16G' is not a size; write e.g. '16GiB' (2^30 bytes) or '16GB' (10^9 bytes)"),
            ("lots", "'lots' is not a size; write e.g. '16GiB' (2^30 bytes) or '16GB' (10^9 bytes)"),
            ("-1GB", "'-1GB' is not a size; write e.g. '16GiB' (2^30 bytes) or '16GB' (10^9 bytes)"),
            ("1.5B", "'1.5B' is not a whole number of bytes"),
            ("0.1KiB", "'0.1KiB' is not a whole number of bytes"),
            (-1, "a size cannot be negative, got -1"),
            (True, "True is not a size; write e.g. '16GiB' or '16GB'"),
            (1.5, "must be a size such as '16GiB' or a byte count, got 1.5"),
            (None, "must be a size such as '16GiB' or a byte count, got None"),
        ],
    )
    def test_what_is_not_a_size(self, value: object, message: str) -> None:
        with pytest.raises(ConfigError) as caught:
            parse_size(value)

        assert caught.value.errors == [("", message)]

    def test_absurd_sizes_are_refused_quickly(self) -> None:
        for text in ("1e99999999GB", "1" * 5000, "1e-99999999"):
            with pytest.raises(ConfigError, match="is not a size"):
                parse_size(text)

    def test_format_bytes_shows_both_units(self) -> None:
        assert format_bytes(16 * GiB) == "16.00 GiB (17.18 GB)"
