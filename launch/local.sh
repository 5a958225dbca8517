#!/usr/bin/env bash
# Runs the main job as N processes on this machine (CPU, gloo collectives), as
# a multi-host run would, to test multi-process code without a cluster.
#
# Usage:
#   launch/local.sh N [ARGS of python -m distill_jax.main ...]
#   launch/local.sh 2 --config=configs/synthetic.py:tiny --workdir=/tmp/distill_mp
#
# Every process gets the same ARGS (so the same workdir) and, through the
# variables distill_jax/distributed.py reads, coordinator 127.0.0.1:PORT, the
# count N and its id 0..N-1. Each process sees DEVICES_PER_PROCESS virtual CPU
# devices, so the mesh spans N * DEVICES_PER_PROCESS devices; batch sizes must
# be multiples of that. Output lines are prefixed with "[pI] ".
#
# Environment (optional):
#   PYTHON               interpreter with distill_jax installed (default: python)
#   PORT                 coordinator port (default: a free one)
#   DEVICES_PER_PROCESS  virtual CPU devices per process (default: 1)
#
# Exits 0 when every process succeeds; otherwise stops the others and exits
# with the status of the first process that failed.
set -euo pipefail

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  echo "launch/local.sh needs bash >= 5.1 (wait -n -p); this is $BASH_VERSION" >&2
  exit 2
fi

usage="usage: launch/local.sh N [ARGS of python -m distill_jax.main ...]"
if [[ $# -lt 1 ]]; then
  echo "$usage" >&2
  exit 2
fi
num_processes=$1
shift
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: N=$num_processes is invalid: expected a process count >= 1. $usage" >&2
  exit 2
fi
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-1}
if ! [[ $devices =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: DEVICES_PER_PROCESS=$devices is invalid: expected an integer >= 1" >&2
  exit 2
fi
# The OS hands out a free port; it may be taken again before process 0 binds
# it, which only fails the run (set PORT to choose one).
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# Replace (not add to) any device count already in XLA_FLAGS, e.g. the 8
# virtual devices of the tests' conftest.py: each process gets its own.
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<<"${XLA_FLAGS:-}")
export XLA_FLAGS="${xla_flags} --xla_force_host_platform_device_count=${devices}"
export JAX_PLATFORMS=cpu
# tcmalloc reuses freed large buffers; glibc malloc returns them to the kernel
# and every step pays page faults again (README.md, "Speed on CPU").
tcmalloc=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [[ -e $tcmalloc && ${LD_PRELOAD:-} != *tcmalloc* ]]; then
  export LD_PRELOAD="${tcmalloc}${LD_PRELOAD:+:$LD_PRELOAD}"
fi
export PYTHONUNBUFFERED=1 # lines reach the prefixing sed as they are written
export DISTILL_JAX_COORDINATOR="127.0.0.1:${port}"
export DISTILL_JAX_NUM_PROCESSES=$num_processes

pids=()
declare -A running=() # pid -> process id, of those not yet waited for

stop_all() {
  # TERM first (orbax/grain threads exit cleanly), KILL whatever is left.
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 20); do
    local alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    [[ $alive == 0 ]] && return
    sleep 0.5
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  DISTILL_JAX_PROCESS_ID=$i "$python" -m distill_jax.main "$@" \
    > >(sed -u "s/^/[p${i}] /") 2>&1 &
  pids+=("$!")
  running[$!]=$i
done

# Wait for the processes in the order they finish: the first failure stops
# the rest, which would otherwise wait for it in a collective until jax's
# heartbeat timeout.
for ((i = 0; i < num_processes; i++)); do
  status=0
  finished=
  wait -n -p finished "${!running[@]}" || status=$?
  process=${running[$finished]:-?}
  [[ -n $finished ]] && unset "running[$finished]"
  if [[ $status != 0 ]]; then
    echo "launch/local.sh: process $process exited with status $status;" \
      "stopping the others" >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
wait # the prefixing sed processes
echo "launch/local.sh: all $num_processes processes finished" >&2
