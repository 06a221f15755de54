"""The run's numbers as a markdown table, a JSON file and a chart.

Everything here reads the results dictionary that ``suite.run`` assembles
(and writes as ``results.json``), so a report can be redrawn from a saved
file: ``python -m benchmarks --redraw benchmarks/results/results.json``.
"""

from __future__ import annotations

import json
import os

from .workloads import GROUPS

MIB = 1024 * 1024
GB = 1e9
COLOURS = {"shmpool": "#e8590c", "shmpool-executor": "#f59f00", "shmpool-queue": "#e8590c",
           "mp-fork": "#364fc7", "mp-spawn": "#74c0fc", "cf-executor": "#1098ad",
           "mp-queue": "#364fc7", "joblib": "#37b24d", "ray-pool": "#ae3ec9",
           "ray-tasks": "#e599f7", "ray-queue": "#ae3ec9",
           "shmpool-simplequeue": "#f59f00", "mp-simplequeue": "#74c0fc"}


# -- cells -------------------------------------------------------------------

def seconds(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 0.001:
        return f"{x:.3g}"
    return f"{x:.2g}"


def _per_run(fig: dict, x: float) -> float:
    """A run's seconds in the figure's unit: seconds, or µs per round trip."""
    return x / fig["per"] * 1e6 if fig["per"] > 1 else x


def unit(fig: dict) -> str:
    if fig["group"] == "W5":
        return "MiB"
    return "µs per round trip" if fig["per"] > 1 else "s"


def _range(fig: dict, s: dict) -> str:
    return (f"{seconds(_per_run(fig, s['median']))} "
            f"({seconds(_per_run(fig, s['min']))}–{seconds(_per_run(fig, s['max']))})")


def size_label(nbytes: int) -> str:
    """``1 MiB``, ``64 KiB``: a payload size as the tables name it."""
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // 1024} KiB"


def scaled_range(s: dict, scale: float) -> str:
    """A summary's ``median (min–max)``, times *scale* (1e3: ms, 1e6: µs)."""
    return f"{s['median'] * scale:.4g} ({s['min'] * scale:.3g}–{s['max'] * scale:.3g})"


def _mib_range(s: dict) -> str:
    return f"{s['median'] / MIB:.1f} ({s['min'] / MIB:.1f}–{s['max'] / MIB:.1f})"


def reference_median(fig: dict, results: dict) -> float | None:
    key = results["reference"][fig["kind"]]
    cell = fig["peers"].get(key, {})
    return cell["seconds"]["median"] if "seconds" in cell else None


def _not_measured(cell: dict) -> str | None:
    if "error" in cell:
        return f"failed: {cell['error']}"
    if "skipped" in cell:
        return f"n/a: {cell['skipped']}"
    return None


# -- markdown ----------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = [_heading(results), "", *_about(results), ""]
    lines += _summary_tables(results)
    lines += _limits_table(results)
    for group, title in GROUPS.items():
        figs = [f for f in results["figures"] if f["group"] == group]
        if not figs:
            continue
        lines += [f"## {group}: {title}", ""]
        for fig in figs:
            lines += _figure_table(fig, results)
    lines += _lifecycle_table(results)
    lines += target_lines(results)
    lines += _problem_lines(results)
    if results.get("closing_note"):
        lines += [results["closing_note"].strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def _heading(results: dict) -> str:
    return "# shmpool benchmark suite: " + ("quick run" if results["quick"] else "full run")


def _about(results: dict) -> list[str]:
    m, v = results["machine"], results["versions"]
    mode = ("quick mode: fewer repeats and smaller counts than the full run"
            if results["quick"] else "full mode")
    lines = [
        f"- Command: `{results['command']}` ({mode}); {results['date']}, "
        f"{results['duration_s'] / 60:.1f} minutes.",
        f"- Each figure: one warm-up run, then {results['repeats']} timed runs per peer, the "
        f"peers taking turns in rotating order; the median, with the min–max range. "
        f"{results['workers']} workers per pool unless the row says otherwise.",
        f"- Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"{m['system']}. Load average (1, 5, 15 min) at the start "
        f"{', '.join(map(str, results['load']['start']))}, at the end "
        f"{', '.join(map(str, results['load']['end']))}.",
        "- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
    ]
    absent = [f"{p['label']} ({p['reason']})" for p in results["peers"].values()
              if not p.get("available")]
    if absent:
        lines.append("- Not measured: " + "; ".join(absent) + ".")
    lines.append("- Ratios (× vs multiprocessing) are multiprocessing's median over the "
                 "peer's: above 1, the peer is faster. Queues are compared with "
                 "multiprocessing.Queue, everything else with multiprocessing.Pool (fork). "
                 "GB/s is the payload over the median; 'of memcpy' is that over the "
                 "machine's warm memcpy rate.")
    return lines


def _columns(results: dict, kind: str) -> list[str]:
    return [k for k, p in results["peers"].items() if p["kind"] == kind and p.get("available")]


def _summary_cell(fig: dict, cell: dict, ref: float | None) -> str:
    if _not_measured(cell):
        return "failed" if "error" in cell else "n/a"
    if fig["group"] == "W5":
        return f"{cell['anon_bytes']['median'] / MIB:.0f} + {cell['shmem_bytes']['median'] / MIB:.0f}"
    med = cell["seconds"]["median"]
    text = seconds(_per_run(fig, med))
    if ref:
        text += f" ({ref / med:.3g}×)"
    return text


def _summary_tables(results: dict) -> list[str]:
    lines = []
    for kind, title in (("pool", "Pools"), ("queue", "Queues")):
        figs = [f for f in results["figures"] if f["kind"] == kind]
        cols = _columns(results, kind)
        if not figs or not cols:
            continue
        lines += [f"## {title}: medians (× vs multiprocessing)", ""]
        lines.append("| figure | unit | " + " | ".join(results["peers"][c]["label"]
                                                   for c in cols) + " |")
        lines.append("|:---|:---|" + "---:|" * len(cols))
        for fig in figs:
            ref = reference_median(fig, results)
            cells = [_summary_cell(fig, fig["peers"].get(c, {"skipped": "?"}), ref) for c in cols]
            what = "MiB anon + shared" if fig["group"] == "W5" else unit(fig)
            lines.append(f"| {fig['group']} {fig['label']} | {what} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _limits_table(results: dict) -> list[str]:
    lim = results.get("limits")
    if not lim:
        return []
    mib = lim["copy_bytes"] // MIB
    lines = ["## The machine's limits, measured in this run", "",
             "| limit | median (min–max) | rate |", "|:---|---:|---:|",
             f"| memcpy of {mib} MiB into warm memory (s) | "
             f"{_range({'per': 1}, lim['memcpy'])} | {lim['memcpy_GBps']:.2f} GB/s |",
             f"| the same copy into fresh shared memory (s) | "
             f"{_range({'per': 1}, lim['fresh_shared_copy'])} | "
             f"{lim['fresh_shared_copy_GBps']:.2f} GB/s |",
             f"| first touch of fresh shared memory (added per GiB) | "
             f"{lim['first_touch_s_per_GiB'] * 1e3:.0f} ms | |",
             f"| pipe round trip of one byte, another process (µs) | "
             f"{_range({'per': lim['pipe_rounds']}, lim['pipe_round_trip'])} | |"]
    for key, s in lim["w1_work"].items():
        lines.append(f"| W1's work, {key}: `np.full` of every array, one process (s) | "
                     f"{_range({'per': 1}, s)} | |")
    lines += ["", "W1's limit is that work divided by the workers, plus one warm memcpy of "
              "the payload.", ""]
    return lines


def _figure_table(fig: dict, results: dict) -> list[str]:
    if fig["group"] == "W5":
        return _memory_table(fig, results)
    memcpy = results.get("limits", {}).get("memcpy_GBps")
    ref = reference_median(fig, results)
    title = f"### {fig['label']}"
    if fig["payload_bytes"]:
        title += f" ({fig['payload_bytes'] / MIB:.0f} MiB per run)"
    lines = [title, "", f"| peer | {unit(fig)}, median (min–max) | GB/s | × vs multiprocessing "
             "| of memcpy |", "|:---|---:|---:|---:|---:|"]
    for key, cell in fig["peers"].items():
        label = results["peers"][key]["label"]
        if reason := _not_measured(cell):
            lines.append(f"| {label} | {reason} | | | |")
            continue
        med = cell["seconds"]["median"]
        rate = fig["payload_bytes"] / med / GB if fig["payload_bytes"] else None
        lines.append(f"| {label} | {_range(fig, cell['seconds'])} "
                     f"| {f'{rate:.2f}' if rate else ''} "
                     f"| {f'{ref / med:.3g}×' if ref else ''} "
                     f"| {f'{rate / memcpy:.0%}' if rate and memcpy else ''} |")
    return lines + [""]


def _memory_table(fig: dict, results: dict) -> list[str]:
    held = fig["held_bytes"]
    lines = [f"### {fig['label']} ({held / MIB:.0f} MiB)", "",
             "Growth of the parent's RssAnon and RssShmem from before the run (after "
             "`malloc_trim`) to while it holds the results, each read whole. Shared "
             "memory that a store had already touched in an earlier run is not counted "
             "again.", "",
             "| peer | anonymous growth, MiB | shared growth, MiB | anonymous / held | s |",
             "|:---|---:|---:|---:|---:|"]
    for key, cell in fig["peers"].items():
        label = results["peers"][key]["label"]
        if reason := _not_measured(cell):
            lines.append(f"| {label} | {reason} | | | |")
            continue
        lines.append(f"| {label} | {_mib_range(cell['anon_bytes'])} "
                     f"| {_mib_range(cell['shmem_bytes'])} "
                     f"| {cell['anon_bytes']['median'] / held:.1%} "
                     f"| {seconds(cell['seconds']['median'])} |")
    return lines + [""]


def _lifecycle_table(results: dict) -> list[str]:
    lines = ["## Start-up and shutdown (not in the figures)", "",
             "Start-up: from the constructor to the answer of a first trivial task. "
             "Shutdown: close and join (or shutdown).", "",
             "| peer | workers | start-up (s) | shutdown (s) |", "|:---|---:|---:|---:|"]
    for row in results["lifecycle"]:
        stop = row.get("shutdown_s")
        start = row.get("startup_s")
        lines.append(f"| {row['label']} | {row.get('workers', '')} | "
                     f"{f'{start:.3f}' if start is not None else ''} | "
                     f"{f'{stop:.3f}' if stop is not None else row.get('shutdown_error', '')} |")
    return lines + [""]


def target_lines(results: dict) -> list[str]:
    found = results.get("targets", [])
    if not found:
        return []
    met = sum(t["met"] is True for t in found)
    lines = [f"## Targets: {met} of {len(found)} met", "",
             "| workload | peer | goal | measured | |", "|:---|:---|:---|:---|:---|"]
    for t in found:
        verdict = {True: "met", False: "**MISSED**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['group']} {t['figure']} | {t['peer']} | {t['goal']} "
                     f"| {t['shown']} | {verdict} |")
    return lines + [""]


def _problem_lines(results: dict) -> list[str]:
    problems = results.get("problems", [])
    if not problems:
        return ["Nothing was left behind: no child process, no name in /dev/shm.", ""]
    return ["## Problems", ""] + [f"- {p}" for p in problems] + [""]


# -- files -------------------------------------------------------------------

def write_json(results: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")


def write_markdown(results: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(results))


def write_chart(results: dict, path: str) -> str | None:
    """Draw the chart; returns why not if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart"
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figs = [f for f in results["figures"] if f["group"] != "W7"]
    scaling = [f for f in results["figures"] if f["group"] == "W7"]
    panels = len(figs) + bool(scaling)
    cols = 3
    rows = (panels + cols - 1) // cols
    chart, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.3 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, fig in zip(flat, figs):
        if fig["group"] == "W5":
            _memory_panel(ax, fig, results)
        else:
            _bar_panel(ax, fig, results)
    if scaling:
        _scaling_panel(flat[len(figs)], scaling, results)
    for ax in flat[panels:]:
        ax.axis("off")
    bottom = 0.0
    if scaling:
        handles, labels = flat[len(figs)].get_legend_handles_labels()
        chart.legend(handles, labels, loc="lower center", ncol=4, fontsize=8,
                     title="W7 lines", title_fontsize=8)
        bottom = 0.6 / (3.3 * rows)
    mode = "quick run" if results["quick"] else "full run"
    chart.suptitle(f"shmpool against its peers ({mode}, {results['workers']} workers, "
                   f"{results['machine']['cpus']} CPUs): median of {results['repeats']}, "
                   f"bars min–max, shorter is better", fontsize=12)
    chart.tight_layout(rect=(0, bottom, 1, 0.98))
    chart.savefig(path, dpi=90)
    plt.close(chart)
    return None


def _measured(fig: dict, results: dict, metric: str) -> list[tuple[str, dict, str]]:
    """(label, summary, key) of the peers that measured *metric*, in order."""
    return [(results["peers"][key]["label"], cell[metric], key)
            for key, cell in fig["peers"].items() if metric in cell]


def _is_shmpool(key: str, results: dict) -> bool:
    return results["peers"][key]["family"] == "shmpool"


def _bar_panel(ax, fig: dict, results: dict) -> None:
    rows = _measured(fig, results, "seconds")[::-1]
    scale = (1e6 / fig["per"]) if fig["per"] > 1 else 1.0
    meds = [s["median"] * scale for _, s, _ in rows]
    lows = [m - s["min"] * scale for m, (_, s, _) in zip(meds, rows)]
    highs = [s["max"] * scale - m for m, (_, s, _) in zip(meds, rows)]
    colours = [COLOURS.get(key, "grey") for _, _, key in rows]
    bars = ax.barh(range(len(rows)), meds, xerr=[lows, highs], color=colours, capsize=2,
                   error_kw={"elinewidth": 0.8})
    for bar, (_, _, key) in zip(bars, rows):
        if _is_shmpool(key, results):
            bar.set_edgecolor("black")
            bar.set_linewidth(1.5)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.set_xscale("log")
    for y, (m, high) in enumerate(zip(meds, highs)):
        ax.text(m + high, y, f" {seconds(m)}", va="center", fontsize=7)
    ax.set_xlabel("µs per round trip (log)" if fig["per"] > 1 else "seconds (log)", fontsize=8)
    ax.set_title(f"{fig['group']} {fig['label']}", fontsize=9)
    ax.set_xlim(right=max(meds) * 8 if meds else None)


def _memory_panel(ax, fig: dict, results: dict) -> None:
    anon = _measured(fig, results, "anon_bytes")[::-1]
    shared = {label: s for label, s, _ in _measured(fig, results, "shmem_bytes")}
    a = [s["median"] / MIB for _, s, _ in anon]
    b = [max(shared[label]["median"], 0) / MIB for label, _, _ in anon]
    colours = [COLOURS.get(key, "grey") for _, _, key in anon]
    ax.barh(range(len(anon)), a, color=colours, label="anonymous")
    ax.barh(range(len(anon)), b, left=[max(x, 0) for x in a], color=colours, alpha=0.35,
            hatch="//", label="shared")
    ax.set_yticks(range(len(anon)), [label for label, _, _ in anon], fontsize=8)
    for y, (x, z) in enumerate(zip(a, b)):
        ax.text(max(x, 0) + z, y, f" {x:.0f} + {z:.0f}", va="center", fontsize=7)
    ax.axvline(fig["held_bytes"] / MIB, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("MiB of growth (solid: anonymous, hatched: shared; "
                  "dotted: bytes held)", fontsize=8)
    ax.set_title(f"W5 {fig['label']}", fontsize=9)


def _scaling_panel(ax, figs: list[dict], results: dict) -> None:
    workers = [f["workers"] for f in figs]
    for key, peer in results["peers"].items():
        points = [(w, f["peers"][key]["seconds"]["median"]) for w, f in zip(workers, figs)
                  if "seconds" in f["peers"].get(key, {})]
        if not points:
            continue
        style = {"linewidth": 2.5, "marker": "o"} if _is_shmpool(key, results) else \
                {"linewidth": 1, "marker": "."}
        ax.plot(*zip(*points), label=peer["label"], color=COLOURS.get(key, "grey"), **style)
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(workers)
    ax.set_xlabel("workers", fontsize=8)
    ax.set_ylabel("seconds (log)", fontsize=8)
    ax.set_title(f"W7 {figs[0]['label'].split(',')[0]} by workers", fontsize=9)


def write_all(results: dict, out: str) -> list[str]:
    """results.md, results.json and chart.png under *out*; notes on what was not written."""
    os.makedirs(out, exist_ok=True)
    write_json(results, os.path.join(out, "results.json"))
    notes = []
    if why := write_chart(results, os.path.join(out, "chart.png")):
        notes.append(why)
    write_markdown(results, os.path.join(out, "results.md"))
    return notes


FILES = ("results.md", "results.json", "chart.png")


def summary_text(results: dict) -> str:
    """What the command prints at the end: the summary tables and the targets."""
    lines = [_heading(results), "", *_about(results), "", *_summary_tables(results),
             *target_lines(results), *_problem_lines(results)]
    return "\n".join(lines).rstrip()
