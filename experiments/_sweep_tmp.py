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
    s = cls(space, seed, **kw); ev = ToyEvaluator(space, target_seed=1000 + seed)
    t0 = time.time(); rs = []
    for _ in range(n):
        p = s.ask(); r = ev.evaluate(p.arch).reward; s.tell(p, r); rs.append(r)
    return name, seed, rs, time.time() - t0, s.invalid_samples

configs = {}
for lr in (3.5e-4, 1e-3, 3e-3):
    for ep, mb in ((4, None), (1, 10), (2, 20)):
        configs[f"ppo lr{lr} e{ep} mb{mb}"] = ("ppo", dict(lr=lr, epochs=ep, minibatch=mb), 0.1)
for lr in (3.5e-4, 1e-3, 3e-3, 1e-2):
    configs[f"rf lr{lr}"] = ("reinforce", dict(lr=lr), 0.1)
configs["ppo lr3e-3 e2 b50 h32"] = ("ppo", dict(lr=3e-3, hidden=32, buffer=50, epochs=2), 0.1)
configs["ppo lr3e-3 e1 mb10 h32"] = ("ppo", dict(lr=3e-3, hidden=32, epochs=1, minibatch=10), 0.1)
configs["ppo lr1e-3 e1 mb10 tanh2.5"] = ("ppo", dict(lr=1e-3, epochs=1, minibatch=10, tanh_constant=2.5), 0.1)
configs["rf lr3e-3 h32"] = ("reinforce", dict(lr=3e-3, hidden=32), 0.1)
configs["rf lr1e-2 h32"] = ("reinforce", dict(lr=1e-2, hidden=32), 0.1)
configs["rf lr3e-3 tanh2.5"] = ("reinforce", dict(lr=3e-3, tanh_constant=2.5), 0.1)
configs["rf lr3e-3 inv0"] = ("reinforce", dict(lr=3e-3, invalid_reward=0.0), 0.1)
configs["random"] = ("random", {}, 0.1)
for P, S in ((50, 10), (20, 5), (30, 10)):
    configs[f"evo P{P} S{S}"] = ("evolution", dict(population=P, sample_size=S), 0.1)

stage = sys.argv[1] if len(sys.argv) > 1 else "fpn"
seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
jobs = [(name, k, kw, seed, 300, stage, init) for name, (k, kw, init) in configs.items() for seed in range(seeds)]
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
