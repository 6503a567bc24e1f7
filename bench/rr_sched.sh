#!/bin/bash
# Where rr's CPU goes with the agent placed by hand (BENCHMARKS.md, "rr and the agent's CPU").
# Runs `loadtest --spawn --scenario rr` (Jaunt only), waits for its Jaunt phase, then measures
# 2 s windows of daemon + agent CPU, context switches and IPIs per request (requests = the
# loadtest's own `sendto` calls in the same window) in each of these states, ROUNDS times:
#   free       the agent's threads may run on every CPU (taskset), SCHED_OTHER
#   hot        the agent's threads pinned to the CPU of the shard serving the rr connection
#   other      pinned to another CPU
#   batch-*    the same with every thread of daemon and agent in SCHED_BATCH (chrt -b)
# With a build whose agent places itself (agent.cpu_placement), `free` is overridden by the
# agent within 0.4 s; use MODES="free batch-free" to compare scheduling policies only.
#   bench/rr_sched.sh DIR_WITH_LOADTEST_AND_JAUNT OUT [ROUNDS]
# Needs perf (with tracepoints), taskset, chrt, bc; as root.
set -u
B=$1; OUT=$2; R=${3:-2}; MODES=${MODES:-"free hot other batch-free batch-hot"}
mkdir -p "$OUT"
"$B/loadtest" --spawn --scenario rr --requests 2000000 --out "$OUT/lt" > "$OUT/lt.log" 2>&1 &
LT=$!
trap 'kill $LT 2>/dev/null; wait' EXIT
for _ in $(seq 300); do
  D=$(pgrep -P $LT -f "jaunt start" | head -1); A=$(pgrep -P $LT -f "jaunt agent" | head -1)
  [ -n "$D" ] && [ -n "$A" ] && break; sleep 0.2
done
[ -n "$D" ] && [ -n "$A" ] || { echo "no daemon/agent"; exit 1; }
ticks() { awk '{print $14+$15}' /proc/$A/stat; }
# The Jaunt phase: the agent starts using CPU.
for _ in $(seq 1200); do a=$(ticks); sleep 0.5; b=$(ticks); [ $((b - a)) -gt 10 ] && break; done
shards() { for t in /proc/$D/task/*; do case $(cat $t/comm) in jaunt-shard*) awk '{print $14+$15, $39}' $t/stat;; esac; done; }
shards > "$OUT/s1"; sleep 1; shards > "$OUT/s2"
HOT=$(paste -d' ' "$OUT/s1" "$OUT/s2" | awk '{d=$3-$1; if (d>m) {m=d; c=$4}} END {print c}')
OTHER=$(( HOT == 0 ? 1 : 0 ))
ALL=$(cat /sys/devices/system/cpu/online)
echo "serving shard on CPU $HOT"
policy() { for t in /proc/$A/task/* /proc/$D/task/*; do chrt "$1" -p 0 "$(basename $t)" 2>/dev/null; done; }
meas() {
  perf stat -x, -e task-clock,context-switches,ipi:ipi_send_cpu -p $D,$A -- sleep 2 2> "$OUT/p.$1" & P=$!
  perf stat -x, -e syscalls:sys_enter_sendto -p $LT -- sleep 2 2> "$OUT/q.$1"; wait $P
  tc=$(grep task-clock "$OUT/p.$1" | cut -d, -f1); cs=$(grep context-sw "$OUT/p.$1" | cut -d, -f1)
  ipi=$(grep ipi "$OUT/p.$1" | cut -d, -f1); rq=$(grep sendto "$OUT/q.$1" | cut -d, -f1)
  echo "$1: $(echo "scale=1; $tc*1000/$rq" | bc) us/req, switches/req $(echo "scale=2; $cs/$rq" | bc)," \
    "IPIs/req $(echo "scale=2; $ipi/$rq" | bc), req/s $((rq / 2)), load $(cut -d' ' -f1 /proc/loadavg)"
}
for r in $(seq "$R"); do
  for m in $MODES; do
    case $m in batch-*) policy -b; where=${m#batch-};; *) policy -o; where=$m;; esac
    case $where in free) cpus=$ALL;; hot) cpus=$HOT;; other) cpus=$OTHER;; esac
    taskset -a -p -c "$cpus" $A > /dev/null
    meas "$m-$r"
  done
done
policy -o
