#!/usr/bin/env bash
# supervise.sh PARENT_PID CMD [ARGS...]
# Runs CMD in a process group of its own and stops the whole group when PARENT_PID exits or
# when this script is told to stop, so nothing the local stack started outlives it.
set -uo pipefail
parent=$1; shift
setsid "$@" &
child=$!
# Every process below $1. `cargo lambda watch` starts each function in a session of its own,
# out of reach of the group kill; a function left behind polls the gone runtime API forever.
tree() {
  local kid
  for kid in $(ps -eo pid=,ppid= | awk -v p="$1" '$2 == p {print $1}'); do tree "$kid"; echo "$kid"; done
}
stop() {
  local below
  below=$(tree "$child")
  kill -TERM -- "-$child" $below 2>/dev/null
  sleep 1
  kill -KILL -- "-$child" $below 2>/dev/null
  exit 0
}
trap stop TERM INT HUP
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 2; done
stop
