#!/usr/bin/env bash
# Install locod as a systemd service. Idempotent: running it again upgrades locod in place.
#
#   sudo scripts/install.sh [--gpu nvidia|jetson]   system service: user `locod`, /opt/locod, /var/lib/locod
#   scripts/install.sh --user [--gpu nvidia]        user service: ~/.local/share/locod, ~/.local/state/locod
# --gpu also builds llama-cpp-python with CUDA (CMAKE_ARGS, default -DGGML_CUDA=on), which PyPI's build lacks.
set -euo pipefail
umask 022  # the software is world-readable; state directories get 0700 explicitly
cd "$(dirname "$0")/.."
for var in XDG_STATE_HOME XDG_DATA_HOME XDG_CONFIG_HOME; do  # a relative one is ignored, as the XDG spec and locod do
  case "${!var:-}" in /*) ;; *) unset "$var" ;; esac
done
mode=system gpu=""
while [ $# -gt 0 ]; do
  case "$1" in
    --user) mode=user ;;
    --gpu) gpu="${2:?--gpu needs nvidia or jetson}"; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
say() { printf 'locod install: %s\n' "$*" >&2; }
have_systemd() { [ -d /run/systemd/system ]; }

if [ "$mode" = system ]; then
  [ "$(id -u)" = 0 ] || { say "the system service needs root (or use --user)"; exit 1; }
  venv=/opt/locod/venv state=/var/lib/locod unit_dir=/etc/systemd/system
  if ! id locod >/dev/null 2>&1; then
    useradd --system --home-dir "$state" --no-create-home --shell /usr/sbin/nologin locod
    say "created system user locod"
  fi
  install -d -m 0700 -o locod -g locod "$state" "$state/models"
  install -d -m 0755 /etc/locod
else
  venv="${XDG_DATA_HOME:-$HOME/.local/share}/locod/venv"
  state="${XDG_STATE_HOME:-$HOME/.local/state}/locod"
  unit_dir="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
  install -d -m 0700 "$state"
fi

# The system service runs as `locod`: its interpreter must not live in a private home (pyenv under /root).
python="${PYTHON:-python3}"
[ "$mode" = system ] && [ -z "${PYTHON:-}" ] && [ -x /usr/bin/python3 ] && python=/usr/bin/python3
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
if [ "$mode" = system ] && ! runuser -u locod -- "$venv/bin/python" -c pass 2>/dev/null; then
  say "user locod cannot run $(readlink -f "$venv/bin/python"); set PYTHON to a system-wide python3"
  exit 1
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet --upgrade '.[http]'  # the service may open the HTTP API (http.listen)
[ "$gpu" = nvidia ] && "$venv/bin/python" -m pip install --quiet 'nvidia-ml-py>=12.535'
# llama-cpp-python builds from source for the CPU alone unless told otherwise: with --gpu, rebuild it with CUDA
# (once: an upgrade keeps a build that offloads). pip's cache or a wheel index would hand back a CPU build,
# hence no cache and no binary.
offloads() { "$venv/bin/python" -c 'import sys, llama_cpp; sys.exit(not llama_cpp.llama_supports_gpu_offload())'; }
if [ -n "$gpu" ] && ! offloads 2>/dev/null; then
  llama=$("$venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')
  say "building llama-cpp-python $llama with CUDA for the GPU (CMAKE_ARGS=${CMAKE_ARGS:=-DGGML_CUDA=on}): many minutes on a Jetson"
  PATH="$PATH:/usr/local/cuda/bin" CMAKE_ARGS="$CMAKE_ARGS" "$venv/bin/python" -m pip install --quiet \
    --force-reinstall --no-cache-dir --no-deps --no-binary llama-cpp-python "llama-cpp-python==$llama"
  offloads || { say "llama-cpp-python $llama still has no GPU offload: is the CUDA toolkit (nvcc) installed?"; exit 1; }
fi
say "installed $("$venv/bin/locod" --version) into $venv"
# Daily use calls `locod` bare: put it on PATH (system: /usr/local/bin; user: ~/.local/bin).
bin_dir=/usr/local/bin
[ "$mode" = system ] || bin_dir="$HOME/.local/bin"
install -d "$bin_dir"
ln -sfn "$venv/bin/locod" "$bin_dir/locod"
case ":$PATH:" in *":$bin_dir:"*) ;; *) say "add $bin_dir to PATH to call locod by name" ;; esac

if [ "$mode" = system ]; then
  LOCOD_MODELS_DIR="$state/models" "$venv/bin/locod" models fetch
  chown -R locod:locod "$state"
  install -m 0644 systemd/locod.service "$unit_dir/locod.service"
  if [ -n "$gpu" ]; then
    install -d "$unit_dir/locod.service.d"
    install -m 0644 "systemd/gpu-$gpu.conf" "$unit_dir/locod.service.d/gpu.conf"
  fi
  if have_systemd; then
    systemctl daemon-reload
    systemctl enable locod.service
    systemctl restart locod.service  # a restart runs the new code; the unit's ExecReload (locod reload) would not
    say "running: systemctl status locod; logs: journalctl -u locod"
  else
    say "systemd is not running here: the unit is installed but not started"
  fi
else
  "$venv/bin/locod" models fetch
  install -d "$unit_dir"
  # The unit's two commands name ~/.local/share/locod/venv; with $XDG_DATA_HOME set the venv is elsewhere: name the one
  # installed (quoted, '%' doubled for systemd's specifiers; '\', '&' and '|' escaped for sed).
  start="$venv/bin/locod"
  start="${start//%/%%}" && start="${start//\\/\\\\}" && start="${start//&/\\&}" && start="${start//|/\\|}"
  sed -e "s|^ExecStart=%h/.local/share/locod/venv/bin/locod |ExecStart=\"$start\" |" \
    -e "s|^ExecReload=%h/.local/share/locod/venv/bin/locod |ExecReload=\"$start\" |" systemd/user/locod.service \
    >"$unit_dir/locod.service.new"
  chmod 0644 "$unit_dir/locod.service.new"
  mv -f "$unit_dir/locod.service.new" "$unit_dir/locod.service"
  # A daemon started by hand (scripts/quickstart.sh) holds the socket and state the service would use
  running=no
  systemctl --user is-active --quiet locod.service 2>/dev/null || ! "$venv/bin/locod" status >/dev/null 2>&1 ||
    running=yes
  if have_systemd; then
    systemctl --user daemon-reload
    systemctl --user enable locod.service
    if [ "$running" = yes ]; then  # the service would exit, "another locod daemon is already running", and retry
      say "stopping the locod daemon started by hand, so that the service takes its place"
      "$venv/bin/locod" stop
    fi
    systemctl --user restart locod.service  # a restart runs the new code; a reload would not
    say "running: systemctl --user status locod; logs: journalctl --user -u locod"
  elif [ "$running" = yes ]; then
    say "systemd is not running here: the unit is installed but not started; a locod daemon started by hand is" \
      "running, with the code it started with: stop it (\"$venv/bin/locod\" stop), then run the one installed by" \
      "hand with \"$venv/bin/locod\" serve"
  else
    say "systemd is not running here: the unit is installed but not started; run the daemon by hand with" \
      "\"$venv/bin/locod\" serve (\"$venv/bin/locod\" stop stops it)"
  fi
fi
