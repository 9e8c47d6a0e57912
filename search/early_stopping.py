"""Early stopping of hopeless trials: ``search.scheduler=none|asha|median`` (settings in ``search.stopping``).

Trials report ``{"iteration", "loss"}`` (the training loss) every ``proxy_eval.report_every``
iterations. A *stopping rule* sees every report of every trial and may stop a trial at a report;
the trial then ends with status ``stopped`` (:class:`proxy_eval.result.TrialStopped`), its
learning curve so far in ``extra["curve"]`` and its last training loss in ``loss``.

Two rules, the same decisions with either executor:

- ``asha`` -- asynchronous successive halving (one bracket): rungs at ``grace_period * rf^k``
  iterations below ``max_t``. A trial that reaches a rung is recorded there; it is stopped if its
  loss is worse than the ``1 - 1/rf`` quantile (linear interpolation, as ``numpy.percentile``) of
  the losses recorded at that rung *before* it (so with rf = 3 only the best third of a rung goes on).
  The first trial at a rung always goes on.
- ``median`` -- the median stopping rule: from ``grace_period`` on, a trial is stopped when its best
  loss so far is worse than the median, over the other trials that reported at least this far
  (``min_samples`` of them at least), of their mean loss between ``grace_period`` and now.

``executor=ray`` uses Ray Tune's ``ASHAScheduler`` / ``MedianStoppingRule`` (:func:`ray_scheduler`,
configured to these semantics: no pausing, no stop at ``max_t``); ``executor=local`` uses
:class:`Asha` / :class:`MedianStopping` below, plain Python implementations of the same rules
(``tests/search/test_early_stopping.py`` checks them against hand-computed cases and against Ray's
classes on random curves). One rule serves the whole search (all stages), as one Tune experiment does.
On resume the rule is first fed the curves of the trials already in history
(:func:`replay_history`), so it continues with the rungs it had.

The reward a stopped trial gets (:func:`stopped_reward`). The controller must not learn to prefer
codes that get stopped, and must not be told a number the code never earned. A stopped trial is
told the *lowest* final reward among the completed trials of its stage whose loss at the
iteration where it stopped was at least as good as its own (failing that, the lowest completed
reward of the stage; failing that, the floor 0). It is a pessimistic, rank-consistent estimate:
a stopped code never gets more than any completed code that was ahead of it when it was stopped,
so under the stopping rule's own assumption (a rung ranks like the end) proposing stoppable codes
can only lose reward; unlike the floor (0, the reward of a broken trial) it keeps the reward
scale of the stage, so that a few stops do not swamp the advantage estimates of PPO / REINFORCE
with artificial failures.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from detector.errors import UserError
from proxy_eval.result import FLOOR_REWARD, TrialStopped

SCHEDULERS = ("none", "asha", "median")
METRICS = ("loss",)  # what every proxy reports (lower is better); AP at rungs would need an evaluation per rung
TIME_ATTR = "iteration"


@dataclass(frozen=True)
class StoppingSettings:
    """``search.scheduler`` and ``search.stopping``; ``max_t`` is the trial's last iteration."""

    scheduler: str = "none"
    max_t: int = 1
    grace_period: int = 40
    reduction_factor: float = 3.0
    min_samples: int = 3
    metric: str = "loss"

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"search.scheduler={self.scheduler}: choose one of {', '.join(SCHEDULERS)}")
        if self.metric not in METRICS:
            raise UserError(f"search.stopping.metric={self.metric}: the trials report {', '.join(METRICS)} only")
        if self.scheduler == "none":
            return
        if self.grace_period < 1 or self.grace_period > self.max_t:
            raise UserError(f"search.stopping.grace_period={self.grace_period}: must be in [1, the trial's "
                            f"iterations = {self.max_t}]")
        if self.reduction_factor <= 1:
            raise UserError(f"search.stopping.reduction_factor={self.reduction_factor}: must be > 1")
        if self.min_samples < 1:
            raise UserError(f"search.stopping.min_samples={self.min_samples}: must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.scheduler != "none"

    @property
    def rungs(self) -> list[int | float]:
        """ASHA's rung iterations, ascending (the formula of Ray's ``_Bracket``)."""
        count = int(math.log(self.max_t / self.grace_period) / math.log(self.reduction_factor) + 1)
        return [self.grace_period * self.reduction_factor ** k for k in range(count)]


def default_grace(max_t: int, scheduler: str = "asha") -> int:
    """``search.stopping.grace_period=null``: two thirds of the trial's iterations for ``median`` (200
    of the end-to-end proxy's 300, 80 of the cached proxy's 120), half for ``asha`` (150, 60).

    The evidence (README, "Early stopping"): replaying the end-to-end proxy's GPU curves of 16
    architectures against their trained AP, the median rule from 200 kept the trained top-3 in 97% of
    replays (from 150: 90.5%), the issue's bar being 95%; and on one H100 (session 14) a search with it
    trained 1.20x the candidates per GPU-hour of the same search without a scheduler, keeping the
    trained top-3 of its baseline. ASHA meets that bar only from a rung at 250 (94.5%, 1.11x); at 150
    it kept the trained best in 99% of replays and the top-3 in 80%, at 100 the best in 47-49%."""
    if scheduler == "median":
        return max(1, round(2 * max_t / 3))
    return max(1, max_t // 2)


def stopping_settings(cfg: Any) -> StoppingSettings:
    """The settings from a composed search config; ``max_t`` is the proxy's ``iters``
    (the toy proxy's ``curve_steps``)."""
    scheduler = str(cfg.search.get("scheduler", "none") or "none")
    node = cfg.search.get("stopping", None) or {}
    proxy = cfg.get("proxy_eval", None) or {}
    max_t = proxy.get("iters", None) if proxy.get("name", None) != "toy" else proxy.get("curve_steps", None)
    if scheduler != "none" and not max_t:
        raise UserError(f"search.scheduler={scheduler}: proxy_eval={proxy.get('name', None)} reports no learning "
                        "curve to stop on (with proxy_eval=toy set proxy_eval.curve_steps > 0)")
    grace = node.get("grace_period", None)
    try:
        return StoppingSettings(scheduler=scheduler, max_t=int(max_t or 1),
                                grace_period=default_grace(int(max_t or 1), scheduler) if grace is None else int(grace),
                                reduction_factor=float(node.get("reduction_factor", 3)),
                                min_samples=int(node.get("min_samples", 3)),
                                metric=str(node.get("metric", "loss")))
    except (TypeError, ValueError) as err:
        raise UserError(f"search.stopping: {err}") from None


# ---------------------------------------------------------------------- the rules (no Ray)
def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as ``numpy.percentile``."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Asha:
    """Asynchronous successive halving on losses (lower is better); see the module docstring."""

    def __init__(self, settings: StoppingSettings) -> None:
        self.rf = settings.reduction_factor
        self.rungs: list[tuple[float, dict[str, float]]] = [(r, {}) for r in reversed(settings.rungs)]

    def on_report(self, key: str, iteration: float, loss: float) -> bool:
        """Record the report; True when the trial is to be stopped."""
        score = -loss  # higher is better, as Ray compares
        for milestone, recorded in self.rungs:  # highest rung first
            if iteration >= milestone and key in recorded:
                return False  # decided at this rung already
            if iteration < milestone:
                continue
            stop = bool(recorded) and score < percentile(list(recorded.values()), (1 - 1 / self.rf) * 100)
            recorded[key] = score
            return stop
        return False

    def on_complete(self, key: str, iteration: float, loss: float) -> None:
        """The trial ended (any status) with this last point (Ray records it once more)."""
        self.on_report(key, iteration, loss)


class MedianStopping:
    """The median stopping rule on losses (lower is better); see the module docstring."""

    def __init__(self, settings: StoppingSettings) -> None:
        self.grace = settings.grace_period
        self.min_samples = settings.min_samples
        self.curves: dict[str, list[tuple[float, float]]] = {}  # key -> [(iteration, loss)] in report order
        self.stopped: set[str] = set()

    def _running_mean(self, key: str, until: float) -> float:
        window = [loss for it, loss in self.curves[key] if self.grace <= it <= until]
        return sum(window) / len(window) if window else math.nan

    def on_report(self, key: str, iteration: float, loss: float) -> bool:
        if key in self.stopped:
            return False
        self.curves.setdefault(key, []).append((iteration, loss))
        if iteration < self.grace:
            return False
        others = [k for k, curve in self.curves.items() if k != key and curve[-1][0] >= iteration]
        means = [m for m in (self._running_mean(k, iteration) for k in others) if math.isfinite(m)]
        if len(means) < self.min_samples:
            return False
        best = min(loss for _, loss in self.curves[key])
        if best > percentile(means, 50):
            self.stopped.add(key)
            return True
        return False

    def on_complete(self, key: str, iteration: float, loss: float) -> None:
        """The trial ended (any status) with this last point; Ray's rule appends it once more."""
        self.curves.setdefault(key, []).append((iteration, loss))


def make_rule(settings: StoppingSettings) -> Asha | MedianStopping | None:
    """The plain-Python rule of ``settings`` (None for ``none``)."""
    if settings.scheduler == "asha":
        return Asha(settings)
    if settings.scheduler == "median":
        return MedianStopping(settings)
    return None


def ray_scheduler(settings: StoppingSettings) -> Any:
    """Ray Tune's scheduler for ``settings`` (None for ``none``); imports Ray."""
    if settings.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr=TIME_ATTR, metric=settings.metric, mode="min", max_t=settings.max_t,
                             grace_period=settings.grace_period, reduction_factor=settings.reduction_factor,
                             brackets=1, stop_last_trials=False)
    if settings.scheduler == "median":
        from ray.tune.schedulers import MedianStoppingRule

        # min_time_slice=inf: never PAUSE a trial for lack of samples (a paused function trial restarts)
        return MedianStoppingRule(time_attr=TIME_ATTR, metric=settings.metric, mode="min",
                                  grace_period=settings.grace_period, min_samples_required=settings.min_samples,
                                  min_time_slice=math.inf, hard_stop=True)
    return None


class _ReplayedTrial:
    """What Ray's schedulers need of a trial when history is replayed into them: an id."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id

    def __hash__(self) -> int:
        return hash(self.trial_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ReplayedTrial) and other.trial_id == self.trial_id


def row_curve(row: dict[str, Any]) -> list[tuple[float, float]]:
    """The learning curve ``[(iteration, loss)]`` a history row recorded (empty if none)."""
    curve = (row.get("extra") or {}).get("curve") or []
    return [(float(it), float(loss)) for it, loss in curve if loss is not None]


def replay_history(rule: Any, rows: Iterable[dict[str, Any]]) -> int:
    """Feed the curves of trained history rows to a rule (ours or Ray's scheduler), in history
    order, so that a resumed search stops as the uninterrupted one would; returns the trials fed."""
    fed = 0
    for row in rows:
        curve = row_curve(row)
        if row.get("reused") or not curve:
            continue
        key = f"history-{row['trial']}"
        fed += 1
        if isinstance(rule, (Asha, MedianStopping)):
            for iteration, loss in curve:
                rule.on_report(key, iteration, loss)
            rule.on_complete(key, *curve[-1])
            continue
        trial = _ReplayedTrial(key)
        rule.on_trial_add(None, trial)
        for iteration, loss in curve:
            rule.on_trial_result(None, trial, {TIME_ATTR: iteration, "loss": loss})
        rule.on_trial_complete(None, trial, {TIME_ATTR: curve[-1][0], "loss": curve[-1][1]})
    return fed


# ---------------------------------------------------------------------- the trial side (local executor)
class StopReporter:
    """The ``report`` callback of one trial under a local rule: feeds the rule, raises
    :class:`TrialStopped` when it says stop (never at ``max_t``: the training is paid by then).
    ``lock`` serialises trials running in threads; :meth:`finish` tells the rule the trial ended."""

    def __init__(self, rule: Asha | MedianStopping, key: str, max_t: int, lock: Any) -> None:
        self.rule, self.key, self.max_t, self.lock = rule, key, max_t, lock
        self.last: tuple[float, float] = (0, math.nan)

    def __call__(self, values: dict) -> None:
        iteration, loss = values["iteration"], float(values["loss"])
        self.last = (iteration, loss)
        with self.lock:
            stop = self.rule.on_report(self.key, iteration, loss)
        if stop and iteration < self.max_t:
            raise TrialStopped(int(iteration), loss)

    def finish(self) -> None:
        with self.lock:
            self.rule.on_complete(self.key, *self.last)


def recording(report: Callable[[dict], None] | None, curve: list[list[float]], seconds: list[float],
              start: float) -> Callable[[dict], None]:
    """A report callback that appends ``[iteration, loss]`` to ``curve`` and the seconds since
    ``start`` (a ``time.perf_counter()``) to ``seconds`` before calling ``report`` with the attempt's
    record so far added to the values (copies of ``curve`` and ``seconds``, as ``"curve"`` and
    ``"report_seconds"``: reporters that send them on keep no state of their own, and an in-process
    retry, given fresh lists, starts its record again)."""

    def record(values: dict) -> None:
        curve.append([values["iteration"], float(values["loss"])])
        seconds.append(round(time.perf_counter() - start, 4))
        if report is not None:
            report({**values, "curve": [list(point) for point in curve], "report_seconds": list(seconds)})

    return record


# ---------------------------------------------------------------------- the reward of a stopped trial
def _loss_at(curve: list[tuple[float, float]], iteration: float) -> float | None:
    """The loss a curve reported at ``iteration`` (its last report at or before it), None if none."""
    before = [loss for it, loss in curve if it <= iteration]
    return before[-1] if before else None


def stopped_reward(curve: list[tuple[float, float]], stage_rows: Iterable[dict[str, Any]]) -> float:
    """The reward told for a trial stopped with learning curve ``curve`` (see the module docstring):
    the lowest reward of the completed trials at least as good at its last reported iteration, else
    the lowest completed reward of the stage, else the floor."""
    completed = [r for r in stage_rows if r["status"] == "ok" and not r.get("reused")]
    if not completed:
        return FLOOR_REWARD
    if curve:
        iteration, loss = curve[-1]
        ahead = [r for r in completed
                 if (peer := _loss_at(row_curve(r), iteration)) is not None and peer <= loss]
        if ahead:
            return float(min(r["reward"] for r in ahead))
    return float(min(r["reward"] for r in completed))


def stopped_lines(rows: list[dict[str, Any]], limit: int = 10) -> list[str]:
    """The report's "Early stopping" section (nothing when no trial was stopped)."""
    stopped = [r for r in rows if r["status"] == "stopped" and not r.get("reused")]
    if not stopped:
        return []
    trained = sum(not r.get("reused") for r in rows)
    iterations = sorted((r.get("extra") or {}).get("stopped_at") or 0 for r in stopped)
    lines = ["## Early stopping", "",
             f"{len(stopped)} of {trained} trained trials were stopped early by `search.scheduler` "
             f"(at iterations {iterations[0]}-{iterations[-1]}); each is told the lowest final reward of the "
             "completed trials of its stage that were at least as good when it stopped "
             "(search/early_stopping.py).", "",
             "| trial | stage | stopped at | last training loss | reward told |", "|---|---|---|---|---|"]
    for r in stopped[:limit]:
        loss = r.get("loss")
        lines.append(f"| {r['trial']} | {r['stage']} | {(r.get('extra') or {}).get('stopped_at')} | "
                     f"{'-' if loss is None else f'{loss:.4f}'} | {r['reward']:.4f} |")
    if len(stopped) > limit:
        lines.append(f"| ... | {len(stopped) - limit} more | | | |")
    return lines + [""]
