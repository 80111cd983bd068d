"""Draw ``transfer_gbps.svg``: GB/s against N for offload and onboard, beside the ceiling of the same run.

    python benchmarks/plot_transfer.py transfer.json benchmarks/transfer_gbps.svg

Reads the JSON that ``bench_transfer.py`` writes; needs matplotlib (text kept as text, so the SVG stays small).
"""

from __future__ import annotations

import json
import sys
from typing import Any

# upstream Dynamo KVBM 1.6.1 through its vLLM connector, same card and shapes (issue 9), for reference
KVBM = {"offload": {16: 32.6, 64: 46.0, 256: 49.7}, "onboard": {16: 30.7, 64: 43.6, 256: 48.4}}


def main(source: str, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"
    with open(source) as f:
        results: dict[str, Any] = json.load(f)
    ceiling = results["ceiling"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, direction, key in zip(axes, ("offload", "onboard"), ("d2h", "h2d"), strict=True):
        ns = sorted({r["n"] for r in results["rows"]})
        for combo, style in (("LS(outer)<->FC", "o-"), ("FC<->FC", "s-")):
            rows = {
                r["n"]: r
                for r in results["rows"]
                if (r["combo"], r["direction"], r["method"]) == (combo, direction, "auto")
            }
            ax.plot(ns, [rows[n]["gbps"] for n in ns], style, label=f"kvbm_builder, device {combo.split('<')[0]}")
        known = [n for n in ns if n in KVBM[direction]]
        if known:
            ax.plot(known, [KVBM[direction][n] for n in known], "x:", color="grey", label="Dynamo KVBM 1.6.1 (issue 9)")
        ax.axhline(ceiling[key], linestyle="--", color="black", label=f"ceiling {ceiling[key]:.1f} GB/s")
        ax.axhline(0.93 * ceiling[key], linestyle=":", color="black", linewidth=0.8, label="0.93 of ceiling")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("blocks per transfer (4 MiB each)")
        ax.set_title(f"{direction} ({'device -> pinned host' if direction == 'offload' else 'pinned host -> device'})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s, end to end")
    top = max([*results["ceiling"].values(), *(r["gbps"] for r in results["rows"] if r["method"] == "auto")])
    axes[0].set_ylim(0, top * 1.12)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{results['card']}, {results['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
