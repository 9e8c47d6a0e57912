"""Candidates per GPU-hour of experiments/bench_search_throughput.py runs, as a bar chart and a table.

Joins the ``results`` of one or more ``--json`` files of the bench (one file per call; the calls on
the same machine), draws one bar per setting with its ratio against its baseline and a line at
``--target`` x the baseline, and prints a markdown table: each setting's rate, its ratio, its best
candidate and how its rewards agree with its baseline's on the codes both trained to the end.

The baseline: without ``--baseline``, the first file's first setting, for every row. With
``--baseline SETTING`` (as the bench's ``--settings`` names it, e.g. ``off:4:none``, where a call
measured the fast setting first): the one result measured so, for every row; or, where every file
measured it once, each call's own, so that each ratio is side by side within one call (the issue's
figure) even when the host's speed differs between calls:

    python experiments/plot_throughput.py experiments/early_stopping/throughput_gpu/call1-bench.json \\
        experiments/early_stopping/throughput_gpu/call2-bench.json --out experiments/early_stopping/throughput_gpu/throughput.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search_throughput import parse_setting, rate_ratio, reward_agreement  # noqa: E402  (a sibling script)


def measured_mps(result: dict) -> str:
    """The setting's MPS state (``on``, ``off``, ``keep``) from what the bench recorded of the switch:
    "on", "off", "off (2 leftover process(es) killed)" (before session 14 "worker(s)"), "as found"."""
    state = str(result["mps"])
    return "keep" if state == "as found" else state.split(" ")[0]


def ratio_text(rate: float, reference: float) -> str:
    """``"4.10x"``; ``"-"`` where the reference trained nothing (every trial of it failed)."""
    ratio = rate_ratio(rate, reference)
    return "-" if math.isnan(ratio) else f"{ratio:.2f}x"


def setting_label(result: dict) -> str:
    """``"MPS, 16/GPU, asha"`` (with the setting's overrides, if any)."""
    mps = {"off": "no MPS", "on": "MPS"}.get(measured_mps(result), str(result["mps"]))
    label = f"{mps}, {result['trials_per_device']}/GPU, {result['scheduler']}"
    return label + "".join(f"\n{o}" for o in result.get("overrides") or [])


def load_results(paths: list[Path]) -> tuple[list[dict], list[int]]:
    """The results of every file, in order, and for each the index of the file it came from."""
    results, sources = [], []
    for index, path in enumerate(paths):
        found = json.loads(path.read_text())["results"]
        results += found
        sources += [index] * len(found)
    if not results:
        raise ValueError("no settings in " + ", ".join(map(str, paths)))
    return results, sources


def measured_as(result: dict) -> str:
    """``mps:trials:scheduler`` as the bench's ``--settings`` names it (MPS as :func:`measured_mps` reads it)."""
    return f"{measured_mps(result)}:{result['trials_per_device']}:{result['scheduler']}"


def find_baselines(results: list[dict], sources: list[int], setting: str | None) -> list[int]:
    """For each result, the index of its baseline (see the module docstring). Raises ValueError where
    ``setting`` matches no result, or several that are not one per file."""
    if setting is None:
        return [0] * len(results)
    mps, k, scheduler, overrides = parse_setting(setting)
    matches = [i for i, r in enumerate(results)
               if measured_as(r) == f"{mps}:{k}:{scheduler}" and tuple(r.get("overrides") or ()) == overrides]
    if len(matches) == 1:
        return [matches[0]] * len(results)
    per_file = {sources[i]: i for i in matches}
    if matches and len(per_file) == len(matches) == len(set(sources)):  # each call its own baseline
        return [per_file[source] for source in sources]
    measured = ", ".join(measured_as(r) for r in results)
    raise ValueError(f"--baseline {setting}: {len(matches)} settings match, not one nor one per file "
                     f"(measured: {measured})")


def comparison_table(results: list[dict], baselines: list[int] | None = None) -> str:
    """A markdown table of the settings, each against its baseline (``results[baselines[i]]``; default:
    the first result for all); rows without ``trials`` (benches before session 11) get no agreement figures."""
    baselines = baselines or [0] * len(results)
    lines = ["| setting | candidates (stopped) | per GPU-hour | vs baseline | best reward | best code | "
             "rho vs baseline (codes) | largest reward difference |", "|---|---|---|---|---|---|---|---|"]
    for r, b in zip(results, baselines):
        baseline = results[b]
        trials = r.get("trials") or []
        done = [t for t in trials if t["status"] == "ok"]
        best = max(done, key=lambda t: t["reward"]) if done else None
        agree = reward_agreement(baseline.get("trials") or [], trials) if r is not baseline else None
        rho = "-" if not agree or agree["spearman"] is None else f"{agree['spearman']:.2f} ({agree['codes']})"
        diff = "-" if not agree or agree["max_abs_diff"] is None else f"{agree['max_abs_diff']:.4f}"
        best_reward, best_code = (f"{best['reward']:.4f}", best["code"][:48]) if best else ("-", "-")
        label = setting_label(r).replace("\n", " ")
        lines.append(f"| {label} | {r.get('candidates', '?')} ({r.get('stopped', '?')}) | {r['candidates_per_hour']:.0f} | "
                     f"{ratio_text(r['candidates_per_hour'], baseline['candidates_per_hour'])} | {best_reward} | {best_code} | "
                     f"{rho} | {diff} |")
    return "\n".join(lines)


def plot(results: list[dict], target: float, out: Path, title: str, baselines: list[int] | None = None,
         call_labels: list[str] | None = None) -> None:
    """One bar per result (baselines grey), its rate and ratio on top; the target line of each
    baseline across the bars measured against it. ``call_labels``: a first line per bar (the call)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = baselines or [0] * len(results)
    rates = [r["candidates_per_hour"] for r in results]
    references = [results[b]["candidates_per_hour"] for b in baselines]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(results), 4.2))
    bars = ax.bar(range(len(results)), rates,
                  color=["#888888" if i in baselines else "#3a7bd5" for i in range(len(results))])
    for bar, rate, reference in zip(bars, rates, references):
        ax.annotate(f"{rate:.0f}\n{ratio_text(rate, reference)}", (bar.get_x() + bar.get_width() / 2, rate),
                    ha="center", va="bottom", fontsize=8)
    for b in sorted(set(baselines)):  # the target of each baseline, over the bars it is the reference of
        spanned = [i for i, ref in enumerate(baselines) if ref == b]
        level = target * results[b]["candidates_per_hour"]
        ax.hlines(level, min(spanned) - 0.45, max(spanned) + 0.45, color="#c0392b", linestyle="--", linewidth=1)
        ax.annotate(f"target {target:g}x", (min(spanned) - 0.45, level), ha="left", va="bottom",
                    color="#c0392b", fontsize=8)
    labels = [setting_label(r) for r in results]
    if call_labels:
        labels = [f"{call}\n{label}" for call, label in zip(call_labels, labels)]
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("candidates per GPU-hour")
    ax.set_ylim(0, max(max(rates), max(target * ref for ref in references)) * 1.25)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="bench --json files (without --baseline: the baseline's first)")
    parser.add_argument("--baseline", default=None, metavar="MPS:K:SCHEDULER",
                        help="the setting that is the reference of the ratios: measured once, or once per file (each call's own); default: the first measured")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", type=float, default=3.0, help="the goal, as a multiple of the baseline")
    parser.add_argument("--title", default="search throughput, end-to-end proxy, one GPU")
    args = parser.parse_args(argv)
    try:
        results, sources = load_results(args.json)
        baselines = find_baselines(results, sources, args.baseline)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    calls = [args.json[source].stem for source in sources] if len(args.json) > 1 else None
    plot(results, args.target, args.out, args.title, baselines, calls)
    print(comparison_table(results, baselines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
