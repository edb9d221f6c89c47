"""``locod serve``, ``reload`` and ``stop``: running the daemon, and what changes the one that runs."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from locod.commands.common import CONFIG_PLACES, configuration, connect, same_file, set_overrides
from locod.commands.status import code_skew, no_key_warning, waits_for_restart
from locod.errors import ConfigError, LocodError
from locod.protocol import NO_CONFIG_FILE


def cmd_serve(args: argparse.Namespace) -> int:
    # SIGHUP's default ends the process: one sent while the daemon starts (a reload asked for as it loads its
    # model) killed it. Held back until the serving loop takes it (Daemon._install_signals), it reloads then.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from locod.daemon.logs import configure_logging
    from locod.daemon.server import Daemon

    config = configuration(args)
    configure_logging(config.log.level)
    daemon = Daemon(config, args.config, set_overrides(args))
    try:
        daemon.start()
        return daemon.serve_forever()
    finally:
        daemon.close()


def cmd_reload(args: argparse.Namespace) -> int:
    # warn=False: a config file that does not load is the daemon's to reject, naming why; said here as well, each
    # typo was printed twice
    with connect(args, warn=False) as client:
        result = client.reload()
        running = client.daemon_config() if result["reloaded"] else {}
        status = client.status()
    cloud = status["cloud"] if result["reloaded"] else {}
    keyless = cloud.get("no_api_key", {})
    skew = code_skew(status)
    if skew:  # a key or a policy of the installed version is unknown to the daemon's code
        print(f"note: {skew}; a reload re-reads the configuration and the policy, not the code", file=sys.stderr)
    if not result["reloaded"]:
        why = result.get("error") or "the configuration is invalid (see the daemon's log)"  # an older daemon
        print(f"locod: reload rejected, the running configuration kept: {why}", file=sys.stderr)
        return 2
    source = result.get("config")
    if source == NO_CONFIG_FILE:  # a file in another place (~/.config/locod.toml) is not read: say where it looks
        print(f"reloaded, but no config file was found ({CONFIG_PLACES}): defaults and LOCOD_* variables only")
    else:
        print(f"reloaded from {source}")
    _say_when_another_file_was_named(args, source)
    if result.get("models_changed"):  # an older daemon does not say
        print(f"local models: {'; '.join(result['models_changed'])}")
    if result.get("restart_needed"):
        print(waits_for_restart(result["restart_needed"]))
    _say_which_variables_stay_here(running, keyless)
    for name, var in keyless.items():  # one whose variable this shell has is named by the line above
        if not os.environ.get(var):
            print(f"note: {no_key_warning(name, var)}", file=sys.stderr)
    _say_which_key_files_are_not_read(running, cloud.get("key_from_env", []))  # an older daemon: none
    for why in result.get("left_out", {}).values():  # the daemon's own look at the files (an older one: none)
        print(f"note: {why}; it is left out of routing until then", file=sys.stderr)
    if result.get("policy_error"):  # the configuration applied, but the routing policy it names was refused
        print(f"locod: the routing policy was refused: {result['policy_error']}", file=sys.stderr)
        return 1
    return 0


def _say_when_another_file_was_named(args: argparse.Namespace, source: str) -> None:
    """A reload re-reads the file the daemon started with, whatever file the caller names: ``locod --config
    FILE reload`` (or ``$LOCOD_CONFIG``) after editing FILE said "reloaded" and applied nothing of it."""
    named, how = (args.config, "--config") if args.config else (os.environ.get("LOCOD_CONFIG", ""), "$LOCOD_CONFIG")
    if not named or same_file(named, source):
        return
    running = "none, defaults only" if source == NO_CONFIG_FILE else source
    print(
        f"note: {how} {named} is not the running daemon's config file ({running}): a reload re-reads the file "
        f"it was started with; to run with {named}, `locod stop`, then `locod --config {named} serve`",
        file=sys.stderr,
    )


def _say_which_variables_stay_here(running: dict[str, Any], keyless: dict[str, str]) -> None:
    """A reload re-reads the config file in the daemon's environment, not the caller's: a ``LOCOD_*``
    override exported in this shell (``LOCOD_HTTP``), or a cloud key (``LOCOD_CLOUD_API_KEY``), reaches a
    daemon only when it starts. Said once, in one line, for just the variables whose value the running
    daemon does not have (a key's value is never compared: only whether the daemon has one)."""
    from locod.daemon.config import ENV_OVERRIDES, parsed_override

    differing = sorted({f"${var}" for var in keyless.values() if os.environ.get(var)})
    for var, key in ENV_OVERRIDES.items():
        text = os.environ.get(var, "")
        section, _, name = key.partition(".")
        if not text or section not in running or name not in running[section]:
            continue
        try:
            value = parsed_override(key, text, f"${var}")
        except ConfigError:
            value = text  # not a value the daemon could have either
        if value != running[section][name]:
            differing.append(f"${var}")
    if differing:
        print(
            f"note: {', '.join(differing)} in this shell {'is' if len(differing) == 1 else 'are'} not what the "
            "running daemon has: a reload reads the config file, and a daemon keeps the environment it was "
            "started with; put the value in the config file (a key: in an api_key_file), or restart the daemon with it",
            file=sys.stderr,
        )


def _say_which_key_files_are_not_read(running: dict[str, Any], from_env: list[str]) -> None:
    """A model's key variable, set in the daemon's environment, wins over its api_key_file: a key rotated in
    the file and reloaded is not used, and nothing else would say so (the old key keeps working until the
    provider revokes it)."""
    for model in running.get("cloud", {}).get("models", []):
        if model["name"] in from_env and model.get("api_key_file"):
            print(
                f"note: cloud model {model['name']} takes its key from ${model['api_key_env']} in the daemon's "
                f"environment, which wins over its api_key_file {model['api_key_file']}: a key written there is "
                f"used only once the daemon runs without ${model['api_key_env']} (docs/operations.md)",
                file=sys.stderr,
            )


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM to the daemon: it refuses new turns, lets those in flight finish (within
    daemon.shutdown_grace_s), then exits; this waits for that, up to ``--timeout`` seconds. Only a process
    that answers locod's ping with the pid the kernel names as the socket's listener is signalled."""
    import time

    from locod.client import listener_pid

    if not args.endpoint:
        _config_that_names_the_socket(args)
    with connect(args) as client:
        endpoint = client.endpoint
        reported = int(client.ping()["pid"])  # something that is not locod does not answer
    path = endpoint[len("ipc://") :]
    if not endpoint.startswith("ipc://") or Path(path).is_symlink():
        raise LocodError(f"locod stop signals only a daemon on a socket file of this machine, not {endpoint}")
    pid = listener_pid(path)
    if pid != reported:
        raise LocodError(f"the locod at {endpoint} runs in another pid namespace (a container?): stop it there")
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise LocodError(
            f"locod (pid {pid}) is another user's: for the system service, sudo systemctl stop locod"
        ) from None
    except ProcessLookupError:
        raise LocodError(f"locod (pid {pid}) is already gone") from None
    print(f"stopping locod (pid {pid}): turns in flight finish first", file=sys.stderr)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if _exited(pid):
            print("stopped", file=sys.stderr)
            return 0
        time.sleep(0.1)
    raise LocodError(f"locod (pid {pid}) is still stopping after {args.timeout:g} s; see its log")


def _config_that_names_the_socket(args: argparse.Namespace) -> None:
    """A config that does not load names no socket, and `stop` never falls back to another daemon's; but its
    error alone left a user who had made a typo unsure whether the daemon had stopped, and how to stop it: the
    daemon found despite the file (where `status` finds it) is named, with the command that stops it."""
    try:
        configuration(args)
    except ConfigError as exc:
        with connect(args, warn=False) as client:  # none answers: the error says so, and where it looked
            endpoint = client.endpoint
        raise ConfigError(
            f"{exc.message}; the daemon at {endpoint} was not stopped: fix the configuration, or `locod --endpoint "
            f"{endpoint} stop`"
        ) from None


def _exited(pid: int) -> bool:
    """Gone, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
