"""Trials per minute of a search on a real Ray cluster of 1 and 2 nodes, on this machine.

    python experiments/cluster_scaling.py                 # toy trials of 2 s and of 0 s, 12 per run
    python experiments/cluster_scaling.py --sleep 2 --budget 20

For each node count a cluster is started as in tests/search/test_ray_cluster.py (separate ``ray start``
processes, 1 CPU per node, token authentication; :class:`ray_cluster.LocalCluster`), and
``python -m search run proxy_eval=toy proxy_eval.sleep_s=<s> search.workers=2 search.stages=[fpn]``
joins it with ``ray.address=<head>``. ``proxy_eval.sleep_s`` makes each toy trial hold its slot that
long without using the CPU, so a node count's effect on placement shows even on a loaded machine.
Printed per run: the driver's wall time (start, joining, trial actors, trials) and the steady rate,
trials per minute between the first and the last finished trial (``finished_at`` of
history.jsonl, 1-s resolution). Everything started is stopped by process id afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ray_cluster import LocalCluster  # noqa: E402


def one_run(nodes: int, sleep_s: float, budget: int, work: Path) -> dict[str, float]:
    env = {"PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    run_dir = work / f"run-{nodes}-{sleep_s:g}"
    with LocalCluster() as cluster:
        cluster.start_head("head", cpus=1, **env)
        for index in range(1, nodes):
            cluster.add_node(f"node{index}", cpus=1, **env)
        cluster.wait_for_nodes()
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "search", "run", "proxy_eval=toy", "executor=ray",
                               f"ray.address={cluster.address}", "search.workers=2", "search.stages=[fpn]",
                               f"search.budget={budget}", f"proxy_eval.sleep_s={sleep_s}",
                               f"search.run_dir={run_dir}", f"cache_dir={work / 'cache'}"],
                              cwd=ROOT, env=cluster.env(**env), capture_output=True, text=True, timeout=1200)
        wall = time.perf_counter() - start
        cluster.stop()
        assert not cluster.leftover(), "processes of the cluster are left"
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    trained = [r for r in rows if not r["reused"]]
    times = sorted(datetime.fromisoformat(r["finished_at"]).timestamp() for r in trained)
    span = max(times[-1] - times[0], 1.0)
    per_node = {}
    for row in trained:
        name = next(iter(row["extra"]["node_resources"]))
        per_node[name] = per_node.get(name, 0) + 1
    return {"nodes": nodes, "sleep_s": sleep_s, "trials": len(trained), "wall_s": wall,
            "per_min_wall": 60 * len(trained) / wall, "per_min_steady": 60 * (len(trained) - 1) / span,
            "per_node": per_node}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sleep", type=float, nargs="+", default=[2.0, 0.0])
    parser.add_argument("--budget", type=int, default=12)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f} (1 min)", flush=True)
    with tempfile.TemporaryDirectory(prefix="cluster-scaling-") as tmp:
        results = [one_run(nodes, sleep_s, args.budget, Path(tmp)) for sleep_s in args.sleep for nodes in (1, 2)]
    print("| trial (toy) | nodes | trials | driver wall s | trials/min (wall) | trials/min (steady) | trials per node |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| sleep {r['sleep_s']:g} s | {r['nodes']} | {r['trials']} | {r['wall_s']:.0f} | "
              f"{r['per_min_wall']:.1f} | {r['per_min_steady']:.1f} | {r['per_node']} |")
    print(f"load average after: {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
