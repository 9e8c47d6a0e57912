import json, sys, statistics
T = 600.0
for name in sys.argv[1:]:
    rows=[json.loads(l) for l in open(f'/tmp/wt25_demo/{name}/history.jsonl')]
    ok=[r for r in rows if r['status']=='ok']
    best=max(ok,key=lambda r:r['reward'])
    lat=lambda r:r['extra']['latency_ms']
    under=[r for r in ok if lat(r)<=T]
    last=ok[-20:]
    bu=max(under,key=lambda r:r['ap']) if under else None
    print(f"{name}: {len(ok)} trials; best-reward code: AP {best['ap']:.3f}, latency {lat(best):.0f} ms ({'under' if lat(best)<=T else 'OVER'} {T:.0f}); "
          f"trials under target {len(under)}/{len(ok)} (last 20: {sum(lat(r)<=T for r in last)}/20); best AP under target {bu['ap'] if bu else 0:.3f}; "
          f"median latency of last 20 {statistics.median(lat(r) for r in last):.0f} ms; best AP overall {max(r['ap'] for r in ok):.3f}")
