#!/usr/bin/env bash
# Remove the locod service installed by scripts/install.sh. The state (decision log, router state, models)
# and the configuration are kept unless --purge is given.
#
#   sudo scripts/uninstall.sh [--purge]      system service
#   scripts/uninstall.sh --user [--purge]    user service
set -euo pipefail
for var in XDG_STATE_HOME XDG_DATA_HOME XDG_CONFIG_HOME; do  # a relative one is ignored, as the XDG spec and locod do
  case "${!var:-}" in /*) ;; *) unset "$var" ;; esac
done
mode=system purge=no
for arg in "$@"; do
  case "$arg" in
    --user) mode=user ;;
    --purge) purge=yes ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
say() { printf 'locod uninstall: %s\n' "$*" >&2; }
# The pid of the daemon the socket answers for, when it runs from venv $1 (its command line names it); else nothing.
daemon_from() {
  local pid
  pid=$("$1/bin/locod" status --json 2>/dev/null | "$1/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["pid"])' \
    2>/dev/null) || return 0
  case "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" in *"$1/"*) echo "$pid" ;; esac
}
if [ "$mode" = system ]; then
  [ "$(id -u)" = 0 ] || { say "the system service needs root (or use --user)"; exit 1; }
  [ -d /run/systemd/system ] && systemctl disable --now locod.service 2>/dev/null || true
  rm -rf /etc/systemd/system/locod.service /etc/systemd/system/locod.service.d /opt/locod
  [ "$(readlink /usr/local/bin/locod)" = /opt/locod/venv/bin/locod ] && rm -f /usr/local/bin/locod
  [ -d /run/systemd/system ] && systemctl daemon-reload
  if [ "$purge" = yes ]; then
    rm -rf /var/lib/locod /etc/locod
    id locod >/dev/null 2>&1 && userdel locod
    say "removed locod, its state, configuration and user"
  else
    say "removed locod; kept /var/lib/locod and /etc/locod (use --purge to remove them)"
  fi
else
  state="${XDG_STATE_HOME:-$HOME/.local/state}/locod" data="${XDG_DATA_HOME:-$HOME/.local/share}/locod"
  config="${XDG_CONFIG_HOME:-$HOME/.config}"
  [ -d /run/systemd/system ] && systemctl --user disable --now locod.service 2>/dev/null || true
  # one started by hand from the venv (without systemd, install.sh said to) would run on with its code removed
  if [ -x "$data/venv/bin/locod" ] && pid=$(daemon_from "$data/venv") && [ -n "$pid" ]; then
    say "stopping the locod daemon that runs from $data/venv (pid $pid): turns in flight finish first"
    "$data/venv/bin/locod" stop 2>/dev/null || say "it did not stop: kill $pid"
  fi
  rm -f "$config/systemd/user/locod.service"
  # install.sh's link only: a locod installed another way (pipx) keeps its own
  [ "$(readlink "$HOME/.local/bin/locod")" = "$data/venv/bin/locod" ] && rm -f "$HOME/.local/bin/locod"
  rm -rf "$data/venv"
  [ -d /run/systemd/system ] && systemctl --user daemon-reload
  if [ "$purge" = yes ]; then
    rm -rf "$state" "$data" "$config/locod"
    say "removed locod, its state and configuration"
  else
    say "removed locod; kept $state (decision log, router state), $data/models and $config/locod" \
      "(use --purge to remove them)"
  fi
fi
