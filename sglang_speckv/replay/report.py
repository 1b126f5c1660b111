"""Reports for ``speckv replay`` and ``speckv simulate``: JSON, Markdown and PNG plots.

Every figure a report prints is computed here from the raw records (one ``summarize`` for
a replay run, ``SimResult.to_json`` for a simulation), so the JSON, the Markdown and the
plots never disagree. Plots use matplotlib's Agg backend (files only, no display).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sglang_speckv.config import format_size

TIERS = ("device", "host", "storage")  # SGLang's cached_tokens_details, fastest first
TIER_COLORS = {"device": "#4c72b0", "host": "#55a868", "storage": "#c44e52"}
PERCENTILES = (50, 90, 99)
# Bars of the hit-rate-over-time plot: enough to see a cache warm up; each holds at least
# MIN_PER_BIN requests so that one request does not make a bar.
TIME_BINS = 20
MIN_PER_BIN = 3


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- replay


def summarize(run) -> dict:
    """The figures of one replay run (a client.Run)."""
    ok = [r for r in run.results if r.error is None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = {t: sum(r.cached.get(t, 0) for r in ok) for t in TIERS}
    out: dict = {
        "requests": len(run.results),
        "ok": len(ok),
        "errors": len(run.results) - len(ok),
        "error_examples": sorted({r.error for r in run.results if r.error})[:5],
        "stopped": run.stopped,
        "seconds": run.seconds,
        "prompt_tokens": prompt,
        "output_tokens": sum(r.output_tokens for r in ok),
        "cached_tokens": cached,
        "hit_rate": {t: cached[t] / prompt if prompt else 0.0 for t in TIERS},
    }
    out["hit_rate"]["total"] = sum(out["hit_rate"][t] for t in TIERS)
    for name, values in (
        ("ttft_ms", [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]),
        ("e2e_ms", [r.e2e_s * 1e3 for r in ok if r.e2e_s is not None]),
        ("queue_ms", [(r.start_s - r.release_s) * 1e3 for r in run.results]),
    ):
        out[name] = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES} if values else {}
        if values:
            out[name]["mean"] = float(np.mean(values))
    if run.store_samples:
        tiers = run.store_samples[-1]["tiers"]
        raw = sum(t["raw_bytes"] for t in tiers.values())
        coded = sum(t["coded_bytes"] for t in tiers.values())
        out["stored"] = tiers
        out["stored_raw_bytes"] = raw
        out["stored_coded_bytes"] = coded
        out["store_ratio"] = {n: t["raw_bytes"] / t["coded_bytes"] for n, t in tiers.items() if t["coded_bytes"]}
        if coded:
            out["store_ratio"]["total"] = raw / coded
    return out


def replay_json(setup: dict, runs: list) -> dict:
    return {
        "setup": setup,
        "runs": [
            {
                "label": run.label,
                "url": run.url,
                "summary": summarize(run),
                "store_samples": run.store_samples,
                "requests": [r.to_json() for r in run.results],
            }
            for run in runs
        ],
    }


def _ms(d: dict, key: str) -> str:
    return f"{d[key]:.0f}" if key in d else "-"


def replay_markdown(data: dict, plots: list[str]) -> str:
    """A side-by-side summary of the runs in a replay_json document."""
    setup, runs = data["setup"], data["runs"]
    sums = [r["summary"] for r in runs]
    lines = [
        f"# Replay of {setup['trace']}",
        "",
        f"{setup['requests']} requests"
        + (f" (from request {setup['skip_requests']})" if setup.get("skip_requests") else "")
        + f", speedup {setup['speedup']}, concurrency {setup['concurrency']}, "
        f"block tokens {setup.get('block_tokens') or '-'}, max output tokens {setup.get('max_output_tokens') or '-'}, "
        f"seed {setup['seed']}.",
        "",
        "| | " + " | ".join(f"{r['label']} ({r['url']})" for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]

    def row(name: str, cells) -> None:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    row("requests ok / errors", [f"{s['ok']} / {s['errors']}" for s in sums])
    row("ended early", [s["stopped"] or "no" for s in sums])
    row("duration (s)", [f"{s['seconds']:.1f}" for s in sums])
    for p in PERCENTILES:
        row(f"TTFT p{p} (ms)", [_ms(s["ttft_ms"], f"p{p}") for s in sums])
    row("TTFT mean (ms)", [_ms(s["ttft_ms"], "mean") for s in sums])
    for p in (50, 99):
        row(f"end-to-end p{p} (ms)", [_ms(s["e2e_ms"], f"p{p}") for s in sums])
    row("prompt tokens", [f"{s['prompt_tokens']:,}" for s in sums])
    for t in TIERS:
        row(f"hit rate {t}", [f"{s['hit_rate'][t]:.1%}" for s in sums])
    row("hit rate total", [f"{s['hit_rate']['total']:.1%}" for s in sums])
    row("stored raw", [format_size(s["stored_raw_bytes"]) if "stored_raw_bytes" in s else "-" for s in sums])
    row("stored (as written)", [format_size(s["stored_coded_bytes"]) if "stored_coded_bytes" in s else "-" for s in sums])
    row("ratio raw / stored", [f"{s['store_ratio']['total']:.2f}x" if "total" in s.get("store_ratio", {}) else "-" for s in sums])
    lines += ["", "Hit rates are shares of prompt tokens (successful requests) served from each tier "
              "(`meta_info.cached_tokens_details`). TTFT is measured from sending the request to "
              "the first streamed output token."]
    for s, r in zip(sums, runs):
        if s["error_examples"]:
            lines += ["", f"Errors of {r['label']}: " + "; ".join(f"`{e}`" for e in s["error_examples"])]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_ttft_cdf(data: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in data["runs"]:
        v = np.sort([r["ttft_s"] * 1e3 for r in run["requests"] if r["error"] is None and r["ttft_s"] is not None])
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=f"{run['label']} (p50 {np.median(v):.0f} ms)")
        else:
            ax.plot([], [], label=f"{run['label']}: no request completed")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("share of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("TTFT distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hit_rate(data: dict, path: Path) -> None:
    """Per run: share of prompt tokens served by each tier, in consecutive groups of
    requests (by start time), drawn as stacked bars spanning each group's time range."""
    plt = _plt()
    runs = data["runs"]
    ncols = min(len(runs), 2)
    nrows = -(-len(runs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.6 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, run in zip(axes.flat, runs):
        ok = sorted((r for r in run["requests"] if r["error"] is None and r["prompt_tokens"]), key=lambda r: r["start_s"])
        groups = [g for g in np.array_split(np.arange(len(ok)), min(TIME_BINS, max(1, len(ok) // MIN_PER_BIN))) if len(g)]
        bottom = np.zeros(len(groups))
        left = np.array([ok[g[0]]["start_s"] for g in groups])
        right = np.append(left[1:], max(run["summary"]["seconds"], left[-1] + 1e-3)) if groups else left
        for t in TIERS:
            share = np.array([sum(ok[k]["cached"].get(t, 0) for k in g) / sum(ok[k]["prompt_tokens"] for k in g) for g in groups])
            ax.bar(left, share, width=right - left, bottom=bottom, align="edge", color=TIER_COLORS[t], label=t,
                   edgecolor="white", linewidth=0.5)
            bottom += share
        ax.set_title(f"{run['label']}: {run['summary']['hit_rate']['total']:.0%} of prompt tokens cached")
        ax.set_xlabel("request start (s)")
        ax.set_ylim(0, 1)
        ax.grid(True, axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("share of prompt\ntokens cached")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), title="served from")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stored_bytes(data: dict, path: Path) -> bool:
    """Stored bytes per tier over time: as written (solid) and raw (dashed). False if no run
    sampled its store."""
    runs = [r for r in data["runs"] if r["store_samples"]]
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        ts = [s["t"] for s in run["store_samples"]]
        for tier in run["store_samples"][-1]["tiers"]:
            coded = [s["tiers"].get(tier, {}).get("coded_bytes", 0) / 2**20 for s in run["store_samples"]]
            raw = [s["tiers"].get(tier, {}).get("raw_bytes", 0) / 2**20 for s in run["store_samples"]]
            (line,) = ax.plot(ts, coded, "-", lw=2, label=f"{run['label']} {tier}: stored")
            if raw != coded:
                ax.plot(ts, raw, "--", color=line.get_color(), lw=1, label=f"{run['label']} {tier}: raw equivalent")
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("MiB")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("bytes held by the storage tiers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_replay_report(report_dir: Path, setup: dict, runs: list) -> list[Path]:
    """replay.json, REPLAY.md and the PNG plots, in ``report_dir``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    data = replay_json(setup, runs)
    (report_dir / "replay.json").write_text(json.dumps(data, indent=1))
    plots = ["ttft_cdf.png", "hit_rate.png"]
    plot_ttft_cdf(data, report_dir / plots[0])
    plot_hit_rate(data, report_dir / plots[1])
    if plot_stored_bytes(data, report_dir / "stored_bytes.png"):
        plots.append("stored_bytes.png")
    (report_dir / "REPLAY.md").write_text(replay_markdown(data, plots))
    return [report_dir / "replay.json", report_dir / "REPLAY.md"] + [report_dir / p for p in plots]


# ----------------------------------------------------------------------------- simulate


def simulate_markdown(setup: dict, res: dict) -> str:
    lines = [
        f"# Simulation of {setup['trace']}",
        "",
        f"{setup['requests']:,} requests" + (f" x {setup['passes']} passes" if setup.get("passes", 1) > 1 else "")
        + f", {res['pages']:,} full pages of {setup['page_tokens']} tokens "
        f"({setup['unique_pages']:,} distinct; no cache can serve more than "
        f"{1 - setup['unique_pages'] / max(1, res['pages']):.1%}), raw page {format_size(setup['raw_page_bytes'])}"
        f", promotion {'on' if setup['promote'] else 'off'}, host cache {format_size(setup['host_bytes'])}.",
        "",
        "| tier | capacity | page as stored | pages it holds | hit rate | read | written | pages out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if setup["host_bytes"]:
        lines.append(f"| host (SGLang L2) | {format_size(setup['host_bytes'])} | raw | | {res['host_hit_rate']:.1%} | | | |")
    for t in res["tiers"]:
        lines.append(
            f"| {t['name']} | {format_size(t['capacity'])} | {format_size(t['page_bytes'])} "
            f"({setup['ratios'][t['name']]:.2f}x) | {t['slots']:,} | {t['hit_rate']:.1%} | "
            f"{format_size(t['bytes_read'])} | {format_size(t['bytes_written'])} | {t['pages_out']:,} |"
        )
    lines += ["", f"Store hit rate {res['store_hit_rate']:.1%}, total {res['hit_rate']:.1%} "
              f"(simulated in {res['seconds']:.2f} s)."]
    if setup.get("pass_hit_rates"):
        lines.append("By pass: " + ", ".join(f"pass {k + 1} {r:.1%}" for k, r in enumerate(setup["pass_hit_rates"])) + ".")
    return "\n".join(lines) + "\n"


def sweep_markdown(setup: dict, rows: list[dict]) -> str:
    tier = setup["sweep_tier"]
    labels = list(rows[0]["curves"])
    lines = [
        f"## Share of prompt pages served from cache against {tier} size",
        "",
        f"| {tier} size | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for row in rows:
        lines.append(f"| {format_size(row['size'])} | "
                     + " | ".join(f"{row['curves'][label]['hit_rate']:.1%}" for label in labels) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(setup: dict, rows: list[dict], path: Path) -> None:
    """Hit rate against the swept tier's capacity, one line per coded-size ratio."""
    plt = _plt()
    tier = setup["sweep_tier"]
    sizes = np.array([r["size"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    first = rows[0]["curves"]["raw"]
    several = sum(1 for t in first["tiers"] if t["capacity"]) > 1
    for label in rows[0]["curves"]:
        (line,) = ax.plot(sizes, [100 * r["curves"][label]["hit_rate"] for r in rows], "o--" if label == "raw" else "o-",
                          lw=2, label="raw pages (1.00x)" if label == "raw" else f"speckv pages, {label}")
        if several:  # how much of it the swept tier serves itself
            own = [100 * next(t["hit_rate"] for t in r["curves"][label]["tiers"] if t["name"] == tier) for r in rows]
            ax.plot(sizes, own, "--" if label == "raw" else "-", color=line.get_color(), lw=1, alpha=0.6,
                    label=f"  of which from {tier}")
    ceiling = 100 * (1 - setup["unique_pages"] / max(1, first["pages"]))
    ax.axhline(ceiling, color="grey", ls=":", label=f"reuse ceiling {ceiling:.0f}% (a page's first use misses)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([format_size(s).replace(" ", "") for s in sizes], rotation=30)
    ax.set_xlabel(f"{tier} tier capacity")
    ax.set_ylabel("prompt pages served from cache (%)")
    ax.set_ylim(0, max(ceiling * 1.1, 1))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    other = ", ".join(f"{t['name']} {format_size(t['capacity'])}" for t in first["tiers"] if t["name"] != tier and t["capacity"])
    host = f", host cache {format_size(setup['host_bytes'])}" if setup["host_bytes"] else ""
    ax.set_title(
        f"{Path(setup['trace']).name}: {setup['requests']:,} requests, {format_size(setup['raw_page_bytes'])} pages"
        f" of {setup['page_tokens']} tokens" + (f", {other}" if other else "") + host,
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_simulate_report(report_dir: Path, setup: dict, res: dict, sweep_rows: list[dict] | None) -> list[Path]:
    """simulate.json, SIMULATE.md and (with a sweep) sweep.png, in ``report_dir``; ``res`` is
    ``SimResult.to_json()``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    md = simulate_markdown(setup, res)
    paths = [report_dir / "simulate.json", report_dir / "SIMULATE.md"]
    if sweep_rows:
        plot_sweep(setup, sweep_rows, report_dir / "sweep.png")
        md += "\n" + sweep_markdown(setup, sweep_rows) + "\n![sweep](sweep.png)\n"
        paths.append(report_dir / "sweep.png")
    (report_dir / "simulate.json").write_text(json.dumps({"setup": setup, "result": res, "sweep": sweep_rows}, indent=1))
    (report_dir / "SIMULATE.md").write_text(md)
    return paths
