#!/usr/bin/env bash
# From a fresh checkout: install locod into .venv, fetch the embedded model, start the daemon in the
# background and ask it a first question. For a supervised service use scripts/install.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
for var in XDG_STATE_HOME XDG_DATA_HOME XDG_CONFIG_HOME; do  # a relative one is ignored, as the XDG spec and locod do
  case "${!var:-}" in /*) ;; *) unset "$var" ;; esac
done
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet .
.venv/bin/locod models fetch
state="${LOCOD_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/locod}"
mkdir -p "$state"
if .venv/bin/locod status >/dev/null 2>&1; then  # a second run, after a `git pull`: the daemon is the old code
  echo "locod was already running and keeps the code it started with: .venv/bin/locod stop, then run this" \
    "again to start what was just installed" >&2
else
  before=$(stat -c %s "$state/daemon.log" 2>/dev/null || echo 0)  # the log is appended to, start after start
  nohup .venv/bin/locod serve >>"$state/daemon.log" 2>&1 &
  pid=$!
  echo "locod daemon started (pid $pid), log: $state/daemon.log" >&2
  for _ in $(seq 1 120); do
    .venv/bin/locod status >/dev/null 2>&1 && break
    if ! kill -0 "$pid" 2>/dev/null; then  # it refused to start (a config, a key file): say why, now
      echo "the daemon did not start; the end of $state/daemon.log:" >&2
      tail -c +$((before + 1)) "$state/daemon.log" | tail -n 3 >&2
      exit 1
    fi
    sleep 0.5
  done
fi
.venv/bin/locod ask -v "In one sentence, what is a daemon in computing?"
echo "Try: .venv/bin/locod chat    .venv/bin/locod status    .venv/bin/locod decisions    (.venv/bin/locod stop stops it)" >&2
