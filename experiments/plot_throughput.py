"""Candidates per GPU-hour of experiments/bench_search_throughput.py runs, as a bar chart and a table.

Joins the ``results`` of one or more ``--json`` files of the bench (settings measured on the same
machine: the first file's first setting is the baseline of the ratios, unless ``--baseline`` names
another, e.g. ``off:4:none`` where a call measured the fast setting first), draws one bar per setting
with its ratio and a line at ``--target`` x the baseline, and prints a markdown table: each
setting's rate, its ratio, its best candidate and how its rewards agree with the baseline's on the
codes both trained to the end (the equal-quality check across calls; the bench's own comparison
covers one call):

    python experiments/plot_throughput.py experiments/early_stopping/throughput_gpu/call1-bench.json \\
        experiments/early_stopping/throughput_gpu/call2-bench.json --out experiments/early_stopping/throughput_gpu/throughput.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search_throughput import parse_setting, reward_agreement  # noqa: E402  (a sibling script)


def measured_mps(result: dict) -> str:
    """The setting's MPS state (``on``, ``off``, ``keep``) from what the bench recorded of the switch:
    "on", "off", "off (2 leftover worker(s) killed)", "as found"."""
    state = str(result["mps"])
    return "keep" if state == "as found" else state.split(" ")[0]


def setting_label(result: dict) -> str:
    """``"MPS, 16/GPU, asha"`` (with the setting's overrides, if any)."""
    mps = {"off": "no MPS", "on": "MPS"}.get(measured_mps(result), str(result["mps"]))
    label = f"{mps}, {result['trials_per_device']}/GPU, {result['scheduler']}"
    return label + "".join(f"\n{o}" for o in result.get("overrides") or [])


def load_results(paths: list[Path]) -> list[dict]:
    results = [r for path in paths for r in json.loads(path.read_text())["results"]]
    if not results:
        raise ValueError("no settings in " + ", ".join(map(str, paths)))
    return results


def find_baseline(results: list[dict], setting: str | None) -> int:
    """Index of the result measured as ``setting`` (``mps:trials:scheduler[:overrides]``, as the bench's
    ``--settings``; MPS as :func:`measured_mps` reads it); ``None``: the first. Raises ValueError
    unless exactly one result matches."""
    if setting is None:
        return 0

    def measured_as(result: dict) -> str:
        return f"{measured_mps(result)}:{result['trials_per_device']}:{result['scheduler']}"

    mps, k, scheduler, overrides = parse_setting(setting)
    matches = [i for i, r in enumerate(results)
               if measured_as(r) == f"{mps}:{k}:{scheduler}" and tuple(r.get("overrides") or ()) == overrides]
    if len(matches) != 1:
        measured = ", ".join(measured_as(r) for r in results)
        raise ValueError(f"--baseline {setting}: {len(matches)} settings match (measured: {measured})")
    return matches[0]


def comparison_table(results: list[dict], baseline_index: int = 0) -> str:
    """A markdown table of the settings against the baseline, ``results[baseline_index]`` (see the
    module docstring); rows without ``trials`` (benches before session 11) get no agreement figures."""
    baseline = results[baseline_index]
    lines = ["| setting | candidates (stopped) | per GPU-hour | vs baseline | best reward | best code | "
             "rho vs baseline (codes) | largest reward difference |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        trials = r.get("trials") or []
        done = [t for t in trials if t["status"] == "ok"]
        best = max(done, key=lambda t: t["reward"]) if done else None
        agree = reward_agreement(baseline.get("trials") or [], trials) if r is not baseline else None
        rho = "-" if not agree or agree["spearman"] is None else f"{agree['spearman']:.2f} ({agree['codes']})"
        diff = "-" if not agree or agree["max_abs_diff"] is None else f"{agree['max_abs_diff']:.4f}"
        best_reward, best_code = (f"{best['reward']:.4f}", best["code"][:48]) if best else ("-", "-")
        label = setting_label(r).replace("\n", " ")
        lines.append(f"| {label} | {r.get('candidates', '?')} ({r.get('stopped', '?')}) | {r['candidates_per_hour']:.0f} | "
                     f"{r['candidates_per_hour'] / baseline['candidates_per_hour']:.2f}x | {best_reward} | {best_code} | "
                     f"{rho} | {diff} |")
    return "\n".join(lines)


def plot(results: list[dict], target: float, out: Path, title: str, baseline_index: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = results[baseline_index]["candidates_per_hour"]
    rates = [r["candidates_per_hour"] for r in results]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(results), 4.2))
    bars = ax.bar(range(len(results)), rates,
                  color=["#888888" if i == baseline_index else "#3a7bd5" for i in range(len(results))])
    for bar, rate in zip(bars, rates):
        ax.annotate(f"{rate:.0f}\n{rate / baseline:.2f}x", (bar.get_x() + bar.get_width() / 2, rate),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(target * baseline, color="#c0392b", linestyle="--", linewidth=1)
    ax.annotate(f"target {target:g}x", (len(results) - 0.5, target * baseline), ha="right", va="bottom",
                color="#c0392b", fontsize=8)
    ax.set_xticks(range(len(results)), [setting_label(r) for r in results], fontsize=7)
    ax.set_ylabel("candidates per GPU-hour")
    ax.set_ylim(0, max(max(rates), target * baseline) * 1.25)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="bench --json files (without --baseline: the baseline's first)")
    parser.add_argument("--baseline", default=None, metavar="MPS:K:SCHEDULER",
                        help="the setting that is the reference of the ratios (default: the first measured)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", type=float, default=3.0, help="the goal, as a multiple of the baseline")
    parser.add_argument("--title", default="search throughput, end-to-end proxy, one GPU")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.json)
        baseline_index = find_baseline(results, args.baseline)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plot(results, args.target, args.out, args.title, baseline_index)
    print(comparison_table(results, baseline_index))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
