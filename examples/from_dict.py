"""Load a configuration from a plain dict (what JSON, TOML or YAML give), then say what each tier holds.

Run: ``python examples/from_dict.py``. Nothing is allocated.
"""

from __future__ import annotations

from typing import Any

from kvbm_builder import ConfigError, KvBlockManagerConfig
from kvbm_builder.layout import LayoutSpec
from kvbm_builder.loading import dump, load

DOCUMENT: dict[str, Any] = {
    "runtime": {"worker_id": 0, "nixl": "enabled"},
    "model": {"num_layers": 32, "outer_dim": 2, "page_size": 32, "inner_dim": 1024, "dtype_width_bytes": 2},
    "device_layout": {"num_blocks": 2048, "allocator": {"kind": "device", "device_id": 0}},
    "host_layout": {"size": "16GiB", "allocator": {"kind": "pinned", "mode": "register"}},
    "disk_layout": {"size": "64GB", "allocator": {"kind": "disk", "directory": "/tmp"}},
}


def summary(config: KvBlockManagerConfig) -> list[str]:
    lines = [f"model: {config.model.bytes_per_block:,} bytes per block of {config.model.page_size} tokens"]
    for tier, layout in config.tiers():
        spec = LayoutSpec.from_config(config.model, layout)
        lines.append(
            f"{tier.name} {tier.slot:<13} {layout.num_blocks:>7,} blocks  {spec.total_bytes / 2**30:8.2f} GiB"
            f"  {layout.layout_type}"
        )
    return lines


def main() -> None:
    config = load(DOCUMENT)
    print("\n".join(summary(config)))
    assert load(dump(config)) == config  # dump gives the dict form back

    model = {("num_layer" if key == "num_layers" else key): value for key, value in DOCUMENT["model"].items()}
    typo = {**DOCUMENT, "model": model, "host_layout": {"size": "16 gigs", "allocator": {"kind": "pinned"}}}
    try:
        load(typo)
    except ConfigError as err:
        print(f"\na document with mistakes gives every problem at once:\n{err}")


if __name__ == "__main__":
    main()
