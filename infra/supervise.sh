#!/usr/bin/env bash
# supervise.sh PARENT_PID CMD [ARGS...]
# Runs CMD in a process group of its own and stops the whole group when PARENT_PID exits or
# when this script is told to stop, so nothing the local stack started outlives it.
set -uo pipefail
parent=$1; shift
setsid "$@" &
child=$!
stop() { kill -TERM -- "-$child" 2>/dev/null; sleep 1; kill -KILL -- "-$child" 2>/dev/null; exit 0; }
trap stop TERM INT HUP
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
stop
