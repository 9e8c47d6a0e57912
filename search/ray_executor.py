"""``executor=ray``: run the search's trials as Ray Tune trials, the searchers driving Tune.

Only this module imports Ray (the GPU machine has none; ``executor=local`` never imports it).

- :class:`StageSearcher` wraps the stages (:class:`~search.loop.StageSequence`) as one
  ``ray.tune.search.Searcher``: ``suggest`` hands out the current stage's next request (None
  while the stage waits for its last trials, ``FINISHED`` after the last stage),
  ``on_trial_complete`` records the result (history line, ``tell``, searcher save).
  Both run in the Tune driver loop of this process, so the logger and the progress bar stay in
  the driver; workers never log.
- :func:`trial_trainable` is the function trainable. A worker builds the evaluator once per
  process from the plain config dict and the feature cache's path, and keeps it (with the
  features it loaded) for the next trials: Tune reuses the trial actors (``reuse_actors``).
  It runs the trial with in-process retries of ``error`` results
  (:func:`search.local_executor.run_trial`) and reports the :class:`TrialResult` as JSON.
- A worker that crashes (process killed, segfault, lost node) is restarted by Tune up to
  ``search.retries`` times (``FailureConfig(max_failures=...)``); a trial that still fails is
  recorded with status ``error`` and the floor reward, and the search goes on.
- Concurrency is ``search.workers`` (``max_concurrent_trials``); each trial asks for
  ``ray.cpus_per_trial`` CPUs and ``ray.gpus_per_trial`` GPUs (fractions allowed), and runs with
  :func:`search.trial_threads.trial_threads` torch threads (``proxy_eval.threads``, else the node's
  cores // the trials that run at once on it).
- Early stopping (``search.scheduler=asha|median``): Tune's ``ASHAScheduler`` /
  ``MedianStoppingRule`` (:func:`search.early_stopping.ray_scheduler`) on the trials' intermediate
  reports ``{"iteration", "loss", "curve"}``; the scheduler is first fed the curves already in
  history (resume). A trial it stops reaches ``on_trial_complete`` with its last intermediate report
  and is recorded with status ``stopped``.
- ``ray.address: null`` starts a private local Ray (dashboard off, worker logs not forwarded);
  ``auto`` or ``host:port`` joins a running cluster, whose nodes must have this project
  importable (``pip install -e .`` on each node) and the feature cache at the same path
  (a shared ``cache_dir``). If Ray is already initialised in this process it is used as is.
  Before joining, the head's address is probed (a TCP connect): nothing there, or a cluster that
  refuses this driver's authentication token, is one :class:`UserError` line naming the fix
  instead of Ray's retries and traceback (:func:`join_cluster`).
- Every trial records where it ran in its result's ``extra`` (``node_id``, ``node_ip`` and the
  node's custom resources, ``node_resources``), so ``history.jsonl`` shows how trials spread over
  the nodes. A node that cannot see the feature cache fails its trial with one line naming the path.
- A search asking for more concurrent trials (``search.workers``) than the cluster's nodes can
  place at once says so in one warning line; the extra trials wait for a free slot.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no per-trial csv/json/tensorboard files
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter honours verbose=0
os.environ.setdefault("TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S", "60")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from detector.errors import UserError  # noqa: E402
from proxy_eval.result import FLOOR_REWARD, TrialResult  # noqa: E402
from search.early_stopping import StoppingSettings, ray_scheduler, replay_history  # noqa: E402
from search.local_executor import run_trial  # noqa: E402
from search.loop import StageRun, StageSequence, TrialRequest  # noqa: E402
from search.trial_threads import node_concurrency, trial_threads  # noqa: E402

log = logging.getLogger(__name__)

_QUIET_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "ray.data")
_WORKER_EVALUATORS: dict[str, Any] = {}  # per worker process: setup key -> evaluator


# ---------------------------------------------------------------------- worker side
_STANDARD_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_NODE: dict[str, Any] = {}  # per worker process: where it runs (see _node)


def _node() -> dict[str, Any]:
    """The node this worker runs on: id, IP and its custom resources (asked once per process)."""
    if not _NODE:
        node_id = ray.get_runtime_context().get_node_id()
        info = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
        custom = {k: v for k, v in info.get("Resources", {}).items()
                  if k not in _STANDARD_RESOURCES and not k.startswith("node:")}
        _NODE.update(node_id=node_id, node_ip=info.get("NodeManagerAddress", ""), node_resources=custom)
    return _NODE


def _worker_evaluator(setup: dict[str, Any]) -> Any:
    evaluator = _WORKER_EVALUATORS.get(setup["key"])
    if evaluator is None:
        from omegaconf import OmegaConf

        from proxy_eval.build import build_evaluator

        cache = setup["cache"]
        if cache is not None and not Path(cache).exists():
            node = _node()["node_ip"] if ray.is_initialized() else socket.gethostname()
            raise UserError(f"the feature cache {cache} is not visible on node {node}: put "
                            "cache_dir on storage that every node mounts at the same path")
        evaluator = build_evaluator(OmegaConf.create(setup["cfg"]), cache=cache)
        _WORKER_EVALUATORS[setup["key"]] = evaluator
    return evaluator


def _set_trial_threads(setup: dict[str, Any]) -> None:
    if setup["cfg"].get("proxy_eval", {}).get("name") == "toy":
        return  # trains nothing (and imports no torch)
    import torch

    torch.set_num_threads(trial_threads(setup["threads"], node_concurrency(setup["workers"], setup["cpus_per_trial"])))


def _intermediate_reporter(setup: dict[str, Any]) -> Any:
    """With a scheduler: a ``report`` callback that sends ``{"iteration", "loss", "curve"}`` to Tune
    (not at ``max_t``: the final report carries that point), with ``report_seconds`` and ``started_at``
    (Unix time of the attempt's start), so that a trial the scheduler stops keeps its timing as a
    completed one does. The curve and the seconds are the attempt's record that
    :func:`search.early_stopping.recording` (in :func:`search.local_executor.run_trial`) adds to the
    values. Tune's scheduler may stop the trial inside ``tune.report`` (Ray ends the trial's thread
    there)."""
    if setup["scheduler"] == "none":
        return None

    def report(values: dict) -> None:
        if values["iteration"] < setup["max_t"]:
            seconds = values["report_seconds"]
            tune.report({"iteration": values["iteration"], "loss": float(values["loss"]), "reward": FLOOR_REWARD,
                         "curve": json.dumps(values["curve"]), "report_seconds": json.dumps(seconds),
                         "started_at": time.time() - seconds[-1]})

    return report


def trial_trainable(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: evaluate ``config["code"]`` and report the result (and, with a scheduler,
    its learning curve as it goes)."""
    try:
        _set_trial_threads(setup)
        evaluator = _worker_evaluator(setup)
    except UserError as err:
        result, attempts = TrialResult.failure("error", f"worker setup failed: {err}"), 1
    except Exception as err:  # noqa: BLE001 - e.g. a cache that cannot be opened on this node
        result, attempts = TrialResult.failure("error", f"worker setup failed: {type(err).__name__}: {err}"), 1
    else:
        result, attempts = run_trial(evaluator, config["code"], setup["seed"], setup["retries"],
                                     report=_intermediate_reporter(setup))
    result.extra = {**result.extra, **_node()}
    curve = result.extra.get("curve") or []
    # the scheduler's last point of the trial: where an ok trial ended; nothing for a failed one
    iteration, loss = curve[-1] if curve and result.ok else (0, float("nan"))
    tune.report({"reward": result.reward, "attempts": attempts, "trial_result": json.dumps(result.to_dict()),
                 "iteration": iteration, "loss": loss})


def stopped_by_scheduler(result: dict[str, Any]) -> TrialResult:
    """The result of a trial Tune's scheduler stopped, from its last intermediate report."""
    curve = json.loads(result.get("curve") or "[]")
    report_seconds = json.loads(result.get("report_seconds") or "[]")
    iteration, loss = int(result["iteration"]), float(result["loss"])
    extra = {"stopped_at": iteration, "curve": curve}
    if report_seconds and "started_at" in result:  # the trial's own clock: from its start to the stopping report
        extra.update(report_seconds=report_seconds, started_at=float(result["started_at"]))
        seconds = float(report_seconds[-1])
    else:
        seconds = float(result.get("time_total_s", 0.0))
    return TrialResult(status="stopped", reward=FLOOR_REWARD, loss=loss, seconds=seconds,
                       error=f"stopped early at iteration {iteration} (training loss {loss:.4g})", extra=extra)


def _trial_name(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


# ---------------------------------------------------------------------- driver side
class StageSearcher(Searcher):
    """The search's stages as one Ray Tune search algorithm (see the module docstring).

    All stages run in one Tune experiment, so trial actors (and the evaluators and features
    they hold) are started once per search: when the current stage has handed out everything,
    ``suggest`` returns None until its last trial is in, then moves to the next stage.
    """

    def __init__(self, stages: StageSequence, first: StageRun, retries: int) -> None:
        super().__init__(metric="reward", mode="max")
        self.stages = stages
        self.stage: StageRun | None = first
        self.retries = retries
        self.requests: dict[str, tuple[StageRun, TrialRequest]] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        while self.stage is not None:
            request = self.stage.next_request()
            if request is not None:
                self.requests[trial_id] = (self.stage, request)
                return {"code": request.code, "key": request.key}
            if not self.stage.finished:
                return None  # trials of this stage still running; the next stage needs their results
            self.stage = self.stages.next_stage()
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        stage, request = self.requests.pop(trial_id, (None, None))
        if request is None:
            return
        if not error and result and "trial_result" in result:
            trial_result = TrialResult.from_dict(json.loads(result["trial_result"]))
            attempts = int(result.get("attempts", 1))
        elif not error and result and "curve" in result:  # stopped by the scheduler at an intermediate report
            trial_result, attempts = stopped_by_scheduler(result), 1
        else:
            trial_result = TrialResult.failure(
                "error", f"the Ray worker running this trial failed {self.retries + 1} time(s) "
                         "(crash or lost node; see the Ray logs)")
            attempts = self.retries + 1
        stage.complete(request, trial_result, attempts)

    # Tune pickles its configuration (tuner.pkl) and may checkpoint its search algorithm; the run
    # dir already holds everything needed to resume, so the live driver state is left out.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stages": None, "stage": None, "requests": {}}

    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


def trial_slots(node_resources: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials asking ``per_trial`` (``cpu``, ``gpu``) one node with these resources holds."""
    fits = [int(node_resources.get("CPU", 0.0) / per_trial["cpu"] + 1e-9)]
    if per_trial["gpu"] > 0:
        fits.append(int(node_resources.get("GPU", 0.0) / per_trial["gpu"] + 1e-9))
    return max(0, min(fits))


AUTH_FIX = ("run it with RAY_AUTH_MODE=token and the head's token: copy the head's ~/.ray/auth_token here or set "
            "RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)")
NO_HEAD_FIX = "start the head there with `ray start --head` (README: Executors and Ray clusters), or use ray.address=null"


def head_endpoint(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of the head that ``address`` names (``auto``: Ray's own lookup), or None."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 - an address Ray cannot resolve is reported by ray.init itself
        return None
    if not resolved or ":" not in resolved:
        return None
    host, _, port = resolved.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else None


def join_cluster(address: str, **init_kwargs: Any) -> None:
    """``ray.init(address=...)`` for a running cluster, each way it can fail as one UserError line.

    The head is probed first (Ray itself retries an unreachable address for minutes). Ray's core
    prints its connection retries straight to the stderr file descriptor, so that is captured
    while joining: shown again after a success, read for the cause after a failure.
    """
    endpoint = head_endpoint(address)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=5).close()
        except OSError as err:
            raise UserError(f"ray.address={address}: no Ray head answers at {endpoint[0]}:{endpoint[1]} "
                            f"({err.strerror or type(err).__name__}); {NO_HEAD_FIX}") from None
    with _stderr_captured() as captured:
        try:
            ray.init(address=address, **init_kwargs)
            failure = None
        except Exception as err:  # noqa: BLE001 - every way of not joining is one line for the user
            failure = err
    text = captured["text"]
    if failure is None:
        if text:
            os.write(2, text.encode())
        return
    if "InvalidAuthToken" in text or "Unauthenticated" in text or type(failure).__name__ == "AuthenticationError":
        raise UserError(f"ray.address={address}: the Ray cluster refused this driver's authentication token; "
                        f"{AUTH_FIX}") from None
    message = str(failure).splitlines()[0] if str(failure) else ""
    raise UserError(f"ray.address={address}: could not join the Ray cluster ({type(failure).__name__}: {message}); "
                    f"{NO_HEAD_FIX}") from None


@contextlib.contextmanager
def _stderr_captured() -> Iterator[dict[str, str]]:
    """Redirect file descriptor 2 (Python's and the Ray core's stderr) to a temporary file; the
    yielded dict holds what was written (``text``) once the block is left."""
    captured = {"text": ""}
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            captured["text"] = file.read().decode(errors="replace")


class RayExecutor:
    """Runs the stages as one Ray Tune experiment under ``<run_dir>/ray``."""

    def __init__(self, cfg_container: dict[str, Any], cache_path: str | None, run_dir: Path, *, seed: int,
                 retries: int, workers: int, address: str | None, cpus_per_trial: float,
                 gpus_per_trial: float, stopping: StoppingSettings | None = None, threads: int | None = None) -> None:
        if cpus_per_trial <= 0 or gpus_per_trial < 0:
            raise UserError(f"ray.cpus_per_trial={cpus_per_trial} must be > 0 and ray.gpus_per_trial="
                            f"{gpus_per_trial} >= 0")
        self.workers, self.retries = int(workers), int(retries)
        self.resources = {"cpu": float(cpus_per_trial), "gpu": float(gpus_per_trial)}
        self.storage = str(Path(run_dir).resolve() / "ray")
        key = hashlib.sha256(json.dumps([cfg_container, cache_path], sort_keys=True, default=str).encode()).hexdigest()
        self.stopping = stopping or StoppingSettings()
        self.setup = {"cfg": cfg_container, "cache": cache_path, "seed": int(seed), "retries": self.retries,
                      "key": key[:16], "threads": threads, "workers": self.workers,
                      "cpus_per_trial": float(cpus_per_trial), "scheduler": self.stopping.scheduler,
                      "max_t": self.stopping.max_t}
        self.owns_ray = False
        self._connect(address)

    def _connect(self, address: str | None) -> None:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        if not ray.is_initialized():
            start = time.perf_counter()
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                          configure_logging=True, logging_level=logging.ERROR)
            if address in (None, "", "local"):
                needed = int(-(-self.workers * self.resources["cpu"] // 1))
                kwargs["num_cpus"] = max(os.cpu_count() or 1, needed)
                try:
                    ray.init(**kwargs)
                except Exception as err:  # noqa: BLE001 - report why Ray could not start, in one line
                    raise UserError(f"executor=ray: could not start a local Ray ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''}); use executor=local") from None
            else:
                join_cluster(str(address), **kwargs)
            self.owns_ray = True
            log.info("Ray started in %.1f s", time.perf_counter() - start)
        available = ray.cluster_resources()
        for key, name in (("cpu", "CPU"), ("gpu", "GPU")):
            if self.resources[key] > available.get(name, 0.0):
                raise UserError(f"ray.{key}s_per_trial={self.resources[key]:g} but the Ray cluster has "
                                f"{available.get(name, 0.0):g} {name}(s); lower it (fractions are allowed)")
        self._check_placement(ray.nodes())

    def _check_placement(self, nodes: list[dict[str, Any]]) -> None:
        """Refuse trials no node can hold; warn once when fewer than ``search.workers`` fit at once."""
        alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
        slots = sum(trial_slots(resources, self.resources) for resources in alive)
        wanted = f"ray.cpus_per_trial={self.resources['cpu']:g} and ray.gpus_per_trial={self.resources['gpu']:g}"
        if slots == 0:
            largest = max(alive, key=lambda r: r.get("CPU", 0.0), default={})
            raise UserError(f"no node of the Ray cluster can hold a trial of {wanted} (the largest has "
                            f"{largest.get('CPU', 0.0):g} CPU(s), {largest.get('GPU', 0.0):g} GPU(s)); "
                            "a trial runs on one node: lower them")
        if self.workers > slots:
            log.warning("search.workers=%d but the Ray cluster (%d node(s)) can place only %d trial(s) of %s at "
                        "once: %d will run at a time; add nodes or lower ray.cpus_per_trial / ray.gpus_per_trial",
                        self.workers, len(alive), slots, wanted, slots)

    def run(self, stages: StageSequence) -> None:
        first = stages.next_stage()
        if first is None:
            return
        trainable = tune.with_resources(tune.with_parameters(trial_trainable, setup=self.setup), self.resources)
        scheduler = ray_scheduler(self.stopping)
        if scheduler is not None:
            fed = replay_history(scheduler, stages.record.history.rows)
            if fed:
                log.info("early stopping (%s): replayed the curves of %d trials from history",
                         self.stopping.scheduler, fed)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=StageSearcher(stages, first, self.retries),
                scheduler=scheduler,
                num_samples=-1,
                max_concurrent_trials=self.workers,
                reuse_actors=True,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=self.storage,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=self.retries),
            ),
        )
        tuner.fit()
        if not stages.done:  # Tune returns early only when stopped (Ctrl-C): resume continues the run
            raise KeyboardInterrupt

    def close(self) -> None:
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
            self.owns_ray = False
