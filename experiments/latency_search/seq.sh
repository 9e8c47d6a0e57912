. /tmp/wt25_demo/common.sh
COMMON="${COMMON/cache_dir=\/tmp\/wt25_demo\/cache/cache_dir=/tmp/wt25_demo/cache2}"
export OMP_NUM_THREADS=1
python -m search run $COMMON search.objective=ap_at_latency search.latency.target_ms=600 search.latency.w=-1 search.latency.w_under=0 search.run_dir=/tmp/wt25_demo/hard > /tmp/wt25_demo/hard.log 2>&1
python -m search run $COMMON search.objective=ap_at_latency search.latency.target_ms=600 search.latency.w=-0.07 search.run_dir=/tmp/wt25_demo/soft > /tmp/wt25_demo/soft.log 2>&1
python -m search run $COMMON search.objective=ap search.latency.measure=true search.run_dir=/tmp/wt25_demo/ap2 > /tmp/wt25_demo/ap2.log 2>&1
python -m search run $COMMON search.objective=pareto search.run_dir=/tmp/wt25_demo/pareto > /tmp/wt25_demo/pareto.log 2>&1
