"""The AP-latency front of a search run: which codes no other trial beats on both AP and latency.

A trained ``ok`` trial is on the front when no other such trial has an AP at least as high *and* a
latency at least as low, one of them strictly. Latency is the median ``extra.latency_ms`` that
trials record when the search measures it (``search.objective=ap_at_latency`` or ``pareto``, or
``search.latency.measure=true``; :mod:`proxy_eval.latency_objective`); trials without it are left out.

:func:`front_section` gives the report's lines (the front table, best AP first, with the target
when there is one) and draws ``pareto_front.png``: every trial as a point (latency, AP), the front's
codes ringed and joined, the target latency as a vertical line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

FRONT_PLOT = "pareto_front.png"


def latency_of(row: dict[str, Any]) -> float | None:
    value = (row.get("extra") or {}).get("latency_ms")
    return float(value) if isinstance(value, (int, float)) else None


def measured_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trained ``ok`` trials that recorded a latency."""
    return [r for r in rows if not r["reused"] and r["status"] == "ok" and latency_of(r) is not None]


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-dominated rows of ``measured_rows(rows)`` (one per code), fastest first."""
    candidates = measured_rows(rows)
    front = []
    for row in candidates:
        ap, latency = float(row.get("ap") or 0.0), latency_of(row)
        dominated = any(
            float(o.get("ap") or 0.0) >= ap and latency_of(o) <= latency
            and (float(o.get("ap") or 0.0) > ap or latency_of(o) < latency)
            for o in candidates if o is not row)
        if not dominated and all(f["code"] != row["code"] for f in front):
            front.append(row)
    return sorted(front, key=latency_of)


def front_section(rows: list[dict[str, Any]], run_dir: Path, target_ms: float | None) -> list[str]:
    """Report lines of the AP-latency front (and the plot), or [] when no trial measured latency."""
    measured = measured_rows(rows)
    if not measured:
        return []
    front = pareto_front(rows)
    _plot(measured, front, run_dir / FRONT_PLOT, target_ms)
    device = (measured[0].get("extra") or {}).get("latency_device", "?")
    under = [r for r in measured if target_ms is not None and latency_of(r) <= target_ms]
    lines = ["## AP-latency front", "",
             f"{len(measured)} trials with a measured latency (median, deployed detector, on `{device}`); "
             f"{len(front)} on the front (no other trial has both a higher AP and a lower latency)."]
    if target_ms is not None:
        best_under = max(under, key=lambda r: float(r.get("ap") or 0.0)) if under else None
        lines.append(f"Target {target_ms:g} ms: {len(under)} trial(s) under it"
                     + (f"; the best AP under it is {float(best_under['ap']):.4f} (trial {best_under['trial']})."
                        if best_under else "."))
    lines += ["", "| on front | trial | code | AP | latency ms (median) | p90 ms | reward |", "|---|---|---|---|---|---|---|"]
    for r in sorted(front, key=lambda r: -float(r.get("ap") or 0.0)):
        extra = r.get("extra") or {}
        lines.append(f"| yes | {r['trial']} | `{r['code']}` | {float(r.get('ap') or 0):.4f} | {latency_of(r):.1f} | "
                     f"{float(extra.get('latency_p90_ms') or 0):.1f} | {float(r['reward']):.4f} |")
    lines += ["", f"![AP-latency front]({FRONT_PLOT})", "",
              "Pick a code: the front's row with the best AP whose latency fits your budget (re-measure it with "
              "`python -m detector latency arch=<code>` at your resolution), then retrain, export and check it "
              "(README: From search to deployment).", ""]
    return lines


def _plot(measured: list[dict[str, Any]], front: list[dict[str, Any]], path: Path, target_ms: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([latency_of(r) for r in measured], [float(r.get("ap") or 0) for r in measured], s=16,
               color="tab:blue", alpha=0.6, label="trials")
    ax.plot([latency_of(r) for r in front], [float(r.get("ap") or 0) for r in front], "-o", color="tab:red",
            ms=7, mfc="none", label="front")
    for r in front:
        ax.annotate(str(r["trial"]), (latency_of(r), float(r.get("ap") or 0)), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if target_ms is not None:
        ax.axvline(target_ms, color="grey", ls="--", lw=1, label=f"target {target_ms:g} ms")
    ax.set_xlabel("latency, median ms (deployed detector)")
    ax.set_ylabel("AP (proxy)")
    ax.set_title("AP-latency front (labels: trial numbers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
