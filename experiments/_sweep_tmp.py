import json, os, sys, time, statistics as st
from multiprocessing import Pool
import torch
torch.set_num_threads(1)
import controller.policy as pol
from search.space import SearchSpace
from controller.ppo import PPOSearcher
from controller.reinforce import ReinforceSearcher
from controller.random_search import RandomSearcher
from controller.evolution import EvolutionSearcher
from proxy_eval.toy import ToyEvaluator

def run(job):
    name, kind, kw, seed, n, stage, init = job
    torch.set_num_threads(1)
    pol.INIT_RANGE = init
    space = SearchSpace(stage)
    cls = dict(ppo=PPOSearcher, reinforce=ReinforceSearcher, random=RandomSearcher, evolution=EvolutionSearcher)[kind]
    s = cls(space, seed, **kw); ev = ToyEvaluator(space, target_seed=100 + seed)
    t0 = time.time(); rs = []
    for _ in range(n):
        p = s.ask(); r = ev.evaluate(p.arch).reward; s.tell(p, r); rs.append(r)
    return name, seed, rs, time.time() - t0, s.invalid_samples

configs = {}
for lr in (3e-3, 1e-2):
    configs[f"ppo h32 b50 e2 lr{lr}"] = ("ppo", dict(hidden=32, buffer=50, epochs=2, lr=lr), 0.1)
    configs[f"ppo h32 b50 e2 mb25 lr{lr}"] = ("ppo", dict(hidden=32, buffer=50, epochs=2, minibatch=25, lr=lr), 0.1)
    configs[f"rf h32 lr{lr}"] = ("reinforce", dict(hidden=32, lr=lr), 0.1)
    configs[f"rf h32 lr{lr} inv0"] = ("reinforce", dict(hidden=32, lr=lr, invalid_reward=0.0), 0.1)
configs["ppo h48 b50 e2 mb25 lr3e-3"] = ("ppo", dict(hidden=48, buffer=50, epochs=2, minibatch=25, lr=3e-3), 0.1)
configs["ppo h32 b100 e1 mb20 lr1e-2"] = ("ppo", dict(hidden=32, buffer=100, epochs=1, minibatch=20, lr=1e-2), 0.1)
configs["ppo h32 b50 e2 mb25 lr3e-3 inv0"] = ("ppo", dict(hidden=32, buffer=50, epochs=2, minibatch=25, lr=3e-3, invalid_reward=0.0), 0.1)
configs["rf h48 lr1e-2"] = ("reinforce", dict(hidden=48, lr=1e-2), 0.1)
configs["ppo default lr1e-3 e2 mb20"] = ("ppo", dict(lr=1e-3, epochs=2, minibatch=20), 0.1)
configs["rf default lr1e-3"] = ("reinforce", dict(lr=1e-3), 0.1)
configs["random"] = ("random", {}, 0.1)

stage = sys.argv[1] if len(sys.argv) > 1 else "fpn"
seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
jobs = [(name, k, kw, seed, 300, stage, init) for name, (k, kw, init) in configs.items() for seed in range(seeds)]
if stage == 'fpn_test':
    pass
jobs.sort(key=lambda j: (j[1] != "ppo", "e4" not in j[0]))  # slowest first
out = {}
with Pool(int(os.environ.get("NPROC", "16"))) as pool:
    for name, seed, rs, secs, inv in pool.imap_unordered(run, jobs):
        out.setdefault(name, []).append((seed, rs, secs, inv))
        print(f"done {name} seed {seed} {secs:.1f}s last50 {st.mean(rs[-50:]):.3f}", flush=True)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), f"sweep_{stage}.json"), "w"))
for name in configs:
    runs = out[name]
    last = [st.mean(r[1][-50:]) for r in runs]; best = [max(r[1]) for r in runs]
    print(f"{name:28s} last50 {st.mean(last):.3f}+-{st.pstdev(last):.3f} min {min(last):.3f} best {st.mean(best):.3f} secs {st.mean(r[2] for r in runs):.1f} inv {st.mean(r[3] for r in runs):.0f}")
