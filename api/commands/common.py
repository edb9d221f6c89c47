"""What every ``locod`` command needs: the configuration (the file, ``LOCOD_*`` variables, ``--set``), the
daemon's socket and its secret, and, when a daemon runs, the directories it uses (a service's differ from a
shell's)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from locod.errors import ConfigError, DaemonNotRunning, LocodError, StorageError, UnsafeSocket
from locod.protocol import NO_CONFIG_FILE, ErrorFrame, Frame
from locod.terminal import shown

SYSTEM_STATE_DIR = Path("/var/lib/locod")  # the system unit's StateDirectory
# Where the config file is looked for, in order, without --config (daemon/config.py, find_config_file).
CONFIG_PLACES = (
    "$LOCOD_CONFIG, $XDG_CONFIG_HOME/locod/config.toml (~/.config/locod/config.toml), /etc/locod/config.toml"
)


def same_file(path: str, source: str) -> bool:
    """Whether ``path``, a file this command line names, is the running daemon's config file ``source`` (which
    may be NO_CONFIG_FILE), however either is spelled."""
    return source != NO_CONFIG_FILE and Path(path).resolve() == Path(source).resolve()


def set_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The ``--set section.key=value`` options, before and after the command, as config overrides."""
    out = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def configuration(args: argparse.Namespace) -> Any:
    """The configuration a daemon started now would run with (the file, ``LOCOD_*`` variables, ``--set``)."""
    from locod.daemon.config import load_config

    return load_config(args.config, overrides=set_overrides(args))


def connect(args: argparse.Namespace, warn: bool = True) -> Any:
    """A client of the daemon at ``--endpoint``, else at the socket the configuration names (``warn``: say so
    when the configuration does not load and the default socket is used)."""
    from locod.client import Client, locate

    try:
        return Client(args.endpoint or locate(_endpoint(args, warn)), secret=_secret(args))
    except UnsafeSocket as exc:
        raise UnsafeSocket(exc.message + _tcp_door(args), code=exc.code) from None


def _tcp_door(args: argparse.Namespace) -> str:
    """The tcp endpoint the config names, for a user the ipc socket is not open to: on a shared machine the
    admin opens it to the others in /etc/locod/config.toml, which their `locod` reads too. Named, not
    connected to on its own: a port nobody serves can be taken by any local user."""
    try:
        tcp = "" if args.endpoint else configuration(args).daemon.tcp
    except ConfigError:
        return ""
    return f"; the config opens {tcp} (daemon.tcp): `locod --endpoint {tcp} ...`" if tcp else ""


def _secret(args: argparse.Namespace) -> str | None:
    """The tcp endpoint's secret: from ``--secret-file`` (owner-only, as the daemon's own), else ``--secret``
    (which every user of the machine can read in the process list), else ``$LOCOD_SECRET``."""
    if args.secret_file and args.secret:
        raise ConfigError("give the tcp secret once: --secret-file or --secret, not both")
    if args.secret_file:
        from locod.daemon.keyfile import read_key_file

        return read_key_file(args.secret_file, "--secret-file")
    return args.secret or os.environ.get("LOCOD_SECRET") or None


def _endpoint(args: argparse.Namespace, warn: bool = True) -> str:
    """The daemon's socket from the config. A config file that does not load must not cut a user off from
    a daemon that runs (perhaps with an older, valid one), nor be reported as "not running": then the
    socket its ``paths.runtime_dir`` names (read on its own) or the default one, if a daemon answers there;
    else the config's error, which is what the user has to fix."""
    from locod.client import check_alive, locate
    from locod.daemon.config import find_config_file, runtime_dir_leniently

    try:
        return str(configuration(args).ipc_endpoint)
    except ConfigError as exc:
        problem = exc
    try:
        path = Path(args.config) if args.config else find_config_file(os.environ)
    except ConfigError:
        path = None
    endpoint = locate(f"ipc://{runtime_dir_leniently(path, os.environ, set_overrides(args))}/locod.sock")
    try:
        check_alive(endpoint)
    except DaemonNotRunning:
        raise ConfigError(
            f"{problem.message}; no daemon answers at {endpoint[6:]}, where the socket would be: fix the config "
            "file, or pass --endpoint"
        ) from None
    if warn:
        print(shown(f"locod: warning: {problem.message}; using the daemon at {endpoint[6:]}"), file=sys.stderr)
    return endpoint


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def frame_json(frame: Frame) -> str:
    """A frame as ``ask --json`` prints it, one line: its type, then its fields."""
    return json.dumps({"type": frame.type, **vars(frame)})


def error_json(exc: LocodError) -> str:
    """What every ``--json`` command prints on stdout when it fails, so that a script reading it (``jq``) gets
    why rather than empty input: the ``error`` frame ``ask --json`` ends its stream with."""
    return frame_json(ErrorFrame.of(exc))


def as_running(args: argparse.Namespace) -> Any:
    """The configuration, with the state directory (and daily cap) of the daemon that runs, if one does:
    a service's differs from a shell's (systemd's $STATE_DIRECTORY, /var/lib/locod), and `locod report` must
    read the log it writes, `locod policy train` write the policy where it loads it."""
    import dataclasses

    config = configuration(args)
    try:
        with connect(args, warn=False) as client:
            running = client.daemon_config()
    except DaemonNotRunning:
        return at_rest(config)
    return dataclasses.replace(
        config,
        paths=dataclasses.replace(config.paths, state_dir=running["paths"]["state_dir"]),
        cloud=dataclasses.replace(config.cloud, daily_cap_usd=running["cloud"]["daily_cap_usd"]),
    )


def at_rest(config: Any) -> Any:
    """With no daemon running: the configuration, or, when only the system service's state directory holds a
    decision log, that directory's, as ``locate`` picks the system socket. Only for the service's own user:
    SQLite creates its -wal and -shm files even for a reader, and root's would leave the service (User=locod)
    unable to open its own log at its next start."""
    import dataclasses

    from locod.daemon.ownership import user_name

    system_db = SYSTEM_STATE_DIR / config.db_path.name
    if os.path.exists(config.db_path) or not os.path.exists(system_db):
        return config  # os.path: a directory this user may not enter is no log to read, not an error
    owner = os.stat(SYSTEM_STATE_DIR).st_uid
    if owner != os.geteuid():
        raise StorageError(
            f"no decision log at {config.db_path}; the system service's, {system_db}, is read as its user: "
            f"`sudo -u {user_name(owner)} locod ...`"
        )
    return dataclasses.replace(config, paths=dataclasses.replace(config.paths, state_dir=str(SYSTEM_STATE_DIR)))


def models_config(args: argparse.Namespace) -> Any:
    """The configuration with the models directory of the daemon that runs, if one does: a service's differs
    from a shell's (the system unit sets LOCOD_MODELS_DIR=/var/lib/locod/models), and a model pulled into the
    shell's would never reach the service, nor would `models list` show the files it runs."""
    from locod.daemon.config import load_config

    overrides = set_overrides(args)
    try:
        with connect(args, warn=False) as client:
            overrides["paths.models_dir"] = client.daemon_config()["paths"]["models_dir"]
    except DaemonNotRunning:
        pass
    return load_config(args.config, overrides=overrides)
