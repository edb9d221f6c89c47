"""What works without a daemon, using the running one's directories when one runs: ``config show``,
``models fetch|pull|list|rm``, ``report`` and ``policy train``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from locod.commands.common import as_running, configuration, connect, models_config, print_json, same_file
from locod.errors import ConfigError, DaemonNotRunning, LocodError
from locod.protocol import NO_CONFIG_FILE


def cmd_config_show(args: argparse.Namespace) -> int:
    """The running daemon's configuration, as it runs; with ``--new`` or ``--set`` (or no daemon running, one
    too old to say, or ``--config`` naming another file than the daemon's: checking a file before a
    restart), the one a daemon started now would run with."""
    new = bool(args.new or args.set)
    data, header = _running_config(args) if not new else (None, "")
    if data is not None and args.config and not same_file(args.config, str(data["source"])):
        header = f"the running daemon reads {data['source']}, not this file; "
        data = None
    if data is None:
        from locod.daemon.config import as_dict

        data = as_dict(configuration(args))
        whence = "" if new else (header or "no daemon is running: ")
        header = f"# {whence}what `locod serve` would start with now: {_sources(data['source'])}"
    if args.json:
        print_json(data)
        return 0
    print(header)
    data.pop("source")
    for section, values in data.items():
        scalars = {k: v for k, v in values.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
        print(f"\n[{section}]")
        _print_toml_keys(scalars)
        for key, items in values.items():
            if key in scalars:
                continue
            for item in items:
                print(f"\n[[{section}.{key}]]")
                _print_toml_keys(item)
    return 0


def _running_config(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """The running daemon's configuration and a header naming it; (None, "") when none runs. Whether the
    config file loads is not its business (the daemon runs what it read): without a daemon, it is said."""
    try:
        with connect(args, warn=False) as client:
            reply = client.config()
    except DaemonNotRunning:
        return None, ""
    except ConfigError:
        configuration(args)  # a file that does not load and no daemon: its error alone is what `config show` says
        raise
    except LocodError as exc:
        if exc.code != "unknown_op":
            raise
        return None, "the running daemon is older than this locod and cannot say (restart it); "
    data = reply["config"]
    header = (
        f"# the running daemon's configuration (pid {reply['pid']}): {_sources(data['source'])} as it was "
        "started or last reloaded;\n# `locod config show --new` shows what a daemon started now would use"
    )
    return data, header


def _sources(source: str) -> str:
    start = "built-in defaults (no config file found)" if source == NO_CONFIG_FILE else source
    return f"{start}, then LOCOD_* variables and --set overrides"


def _print_toml_keys(values: dict[str, Any]) -> None:
    """``key = value`` lines that load back as TOML (JSON's strings, numbers, booleans and arrays are
    TOML's); TOML has no null, so an unset key is a comment."""
    for key, value in values.items():
        print(f"# {key} is not set" if value is None else f"{key} = {json.dumps(value)}")


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from locod.daemon.config import EMBEDDED_MODEL
    from locod.daemon.fetch import fetch

    directory = Path(args.dir) if args.dir else models_config(args).models_dir
    fetch(args.name or EMBEDDED_MODEL.name, directory, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from locod.daemon.download import DEFAULT_MAX_BYTES, terminal_meter
    from locod.daemon.pull import pull_model

    config = models_config(args)
    max_bytes = args.max_size or DEFAULT_MAX_BYTES  # in bytes: the flag's type read it
    meter = terminal_meter(args.name or args.source.rsplit("/", 1)[-1], _say)
    model = pull_model(
        config,
        args.source,
        name=args.name,
        sha256=args.sha256,
        n_ctx=args.ctx,
        meter=meter,
        progress=_say,
        max_bytes=max_bytes,
    )
    _say(
        f"a running daemon offers it after `locod reload`: then --model {model.name} names it (or make it the "
        f"default: local.default = {json.dumps(model.name)} in the config file, and reload)"
    )
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_models_list(args: argparse.Namespace) -> int:
    from locod.daemon.catalog import model_rows, table
    from locod.daemon.config import redacted_url

    config = models_config(args)
    running = _running_models(args)
    rows = model_rows(config, None if running is None else running["resident"])
    if args.json:
        print_json([row.as_dict() for row in rows])
        return 0
    print("\n".join(table(rows)))
    print(
        f"memory: the weights plus the KV cache at that context, counted against local.memory_budget_mb "
        f"({config.local.memory_budget_mb} MiB)"
    )
    for cloud in config.cloud.models:
        print(f"cloud: {cloud.name}, {cloud.model} at {redacted_url(cloud.base_url)}")
    if running is None:
        print("(no daemon is running: nothing is loaded)")
        return 0
    names = [m.name for m in config.local.models] + [m.name for m in config.cloud.models]
    unknown = [name for name in names if name not in running["models"]]
    if unknown:
        print(f"not known to the running daemon until `locod reload`: {', '.join(unknown)}")
    return 0


def _running_models(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """The running daemon's models: ``resident`` (loaded) and ``models`` (local and cloud, configured when it
    started or last reloaded); None when it is not running."""
    try:
        with connect(args) as client:
            status = client.status()
    except DaemonNotRunning:
        return None
    return {"resident": status["local"]["resident"], "models": status["local"]["models"] + status["cloud"]["models"]}


def cmd_models_rm(args: argparse.Namespace) -> int:
    from locod.daemon.pull import remove_model

    print(f"removed {args.name} ({remove_model(models_config(args), args.name)})")
    running = _running_models(args)
    if running is not None and args.name in running["resident"]:  # loaded into memory, it answers on
        _say(f"the running daemon offers {args.name} until `locod reload`")
    elif running is not None and args.name in running["models"]:  # a turn that names it fails: no file to load
        _say(f"the running daemon still lists {args.name}, which it can no longer load, until `locod reload`")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from locod.report import write_report

    out = write_report(as_running(args), since=args.since, out=args.out)
    print(f"wrote {out}")
    return 0


def cmd_policy_train(args: argparse.Namespace) -> int:
    from locod.policy.train_cli import main as train_main

    return train_main(args.train_args, default_out=as_running(args).state_dir / "policy.onnx")
