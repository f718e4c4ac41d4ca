"""The adapter sweep as a picture: throughput and TTFT against the number of adapters."""

from __future__ import annotations

from pathlib import Path

SYSTEMS = {"loraserve": "tab:blue", "peft": "tab:orange"}


def plot_sweep(result: dict, path: Path) -> Path:
    """Two panels (throughput, TTFT p50/p99), one line per system, log-scaled adapter axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for system, color in SYSTEMS.items():
        points = [point for point in result["points"] if system in point]
        if not points:
            continue
        counts = [point["num_adapters"] for point in points]
        summaries = [point[system] for point in points]
        throughput.plot(
            counts, [s["throughput_req_s"] for s in summaries], "o-", color=color, label=system
        )
        for percentile, style in (("p50", "o-"), ("p99", "o--")):
            ttft_values = [s["ttft_s"][percentile] for s in summaries]
            ttft.plot(counts, ttft_values, style, color=color, label=f"{system} {percentile}")
    for axes, label in ((throughput, "throughput (req/s)"), (ttft, "TTFT (s)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("number of adapters")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(
        f"{result['preset']} on {result.get('machine', {}).get('processor') or 'this machine'}, {result.get('date', '')}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
