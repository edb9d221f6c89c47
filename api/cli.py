"""The ``locod`` command: a thin layer over ``locod.client`` (talking to the daemon) and the daemon's entry.

Exit codes: 0 ok, 1 the daemon reported an error, 2 configuration error, 3 model error, 4 storage error,
5 daemon not running.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from locod.errors import ConfigError, DaemonNotRunning, LocodError, ModelError, StorageError
from locod.protocol import DecisionFrame, DeltaFrame, DoneFrame, FallbackFrame, Frame

EXIT_CODES: dict[type[LocodError], int] = {ConfigError: 2, ModelError: 3, StorageError: 4, DaemonNotRunning: 5}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LocodError as exc:
        print(f"locod: {exc.message}", file=sys.stderr)
        return next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1)
    except KeyboardInterrupt:
        return 130


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _config(args: argparse.Namespace) -> Any:
    from locod.daemon.config import load_config

    return load_config(args.config, overrides=_overrides(args))


def _client(args: argparse.Namespace) -> Any:
    from locod.client import Client

    endpoint = args.endpoint or _config(args).ipc_endpoint
    return Client(endpoint, secret=args.secret)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- commands -----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from locod.daemon.logs import configure_logging
    from locod.daemon.server import Daemon

    config = _config(args)
    configure_logging(config.log.level)
    daemon = Daemon(config, args.config, _overrides(args))
    try:
        daemon.start()
        return daemon.serve_forever()
    finally:
        daemon.close()


def cmd_ask(args: argparse.Namespace) -> int:
    from locod.client import attachment

    files = [attachment(p) for p in args.attach or []] + [attachment(p, private=True) for p in args.private or []]
    with _client(args) as client:
        frames = client.chat(
            args.prompt,
            session=args.session,
            model=args.model,
            attachments=files,
            force=args.force,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
        return _stream(frames, args.json, args.verbose)


def _stream(frames: Iterator[Frame], as_json: bool, verbose: bool) -> int:
    for frame in frames:
        if as_json:
            print(json.dumps({"type": frame.type, **vars(frame)}))
        elif isinstance(frame, DeltaFrame):
            print(frame.text, end="", flush=True)
        elif isinstance(frame, DecisionFrame) and verbose:
            sent = ", ".join(frame.attachments_sent) or "none"
            print(f"[{frame.location}: {frame.model}; attachments sent: {sent}; {frame.reason}]", file=sys.stderr)
        elif isinstance(frame, FallbackFrame):
            print(f"\n[{frame.message}]", file=sys.stderr)
        elif isinstance(frame, DoneFrame):
            if not as_json:
                print()
            if verbose:
                print(
                    f"[decision {frame.decision}: {frame.outcome} via {frame.location} {frame.model}, "
                    f"{frame.tokens_out} tokens, {frame.latency_ms:.0f} ms, ${frame.cost_usd:.5f}]",
                    file=sys.stderr,
                )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session = args.session or f"chat-{uuid.uuid4().hex[:8]}"
    print(f"locod chat, session {session}. Empty line or Ctrl-D to leave.", file=sys.stderr)
    with _client(args) as client:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            if not line.strip():
                return 0
            try:
                _stream(client.chat(line, session=session, force=args.force), False, args.verbose)
            except LocodError as exc:
                if isinstance(exc, DaemonNotRunning):
                    raise
                print(f"locod: {exc.message}", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        _print_json(status)
        return 0
    t, r, c, loc = status["telemetry"], status["routing"], status["cloud"], status["local"]
    battery = "no battery" if t["battery_pct"] is None else f"{t['battery_pct']:.0f}%"
    power = "on AC" if t["on_ac"] else "on battery" if t["on_ac"] is False else "power source unknown"
    net = "online" if t["online"] else "offline" if t["online"] is False else "unknown"
    rows = [
        ("daemon", f"locod {status['version']}, pid {status['pid']}, up {status['uptime_s']:.0f} s"),
        (
            "local",
            f"{loc['default']} (resident: {', '.join(loc['resident']) or 'none'}; "
            f"{_fmt(loc['tokens_per_s'], '{:.1f} tok/s')})",
        ),
        (
            "cloud",
            f"{', '.join(c['models']) or 'none configured'}; breaker {c['breaker']}; "
            f"today ${c['spent_today_usd']:.4f}" + (f" of ${c['daily_cap_usd']:.2f}" if c["daily_cap_usd"] else ""),
        ),
        (
            "routing",
            f"mode {r['mode']}, SLA {r['sla']:.2f}, attained {_fmt(r['attained'], '{:.3f}')} over "
            f"{r['turns']} turns, Q {r['q']:.2f}" + (" (SLA INFEASIBLE)" if r["infeasible"] else ""),
        ),
        (
            "device",
            f"battery {battery}, {power}, power {_fmt(t['power_w'], '{:.1f} W')}, "
            f"CPU {_fmt(t['cpu_pct'], '{:.0f}%')} {_fmt(t['cpu_temp_c'], '{:.0f}°C')}, "
            f"GPU {_fmt(t['gpu_pct'], '{:.0f}%')}, free memory {_fmt(t['mem_available_mb'], '{:.0f} MB')}",
        ),
        (
            "network",
            f"{net} via {t['link']}, RTT {_fmt(t['rtt_ms'], '{:.0f} ms')}, upload "
            f"{t['upload_bps'] / 1e6:.1f} MB/s{'' if t['upload_measured'] else ' (prior)'}",
        ),
        (
            "queue",
            f"{status['queue']['in_flight']} in flight, {status['queue']['waiting_for_local']} waiting "
            f"for the local model; {status['sessions']} sessions",
        ),
    ]
    for name, text in rows:
        print(f"{name:>8}  {text}")
    return 0


def _fmt(value: Any, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def cmd_decisions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.decisions(args.limit)
    if args.json:
        _print_json(rows)
        return 0
    columns = (
        "id",
        "session",
        "turn",
        "task",
        "location",
        "model",
        "outcome",
        "tokens_out",
        "latency_total_ms",
        "cost_usd",
        "satisfied",
        "reason",
    )
    table = [[_cell(row.get(c)) for c in columns] for row in reversed(rows)]
    widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c) for i, c in enumerate(columns)]
    widths[-1] = min(widths[-1], 60)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in table:
        print("  ".join(v[:w].ljust(w) for v, w in zip(row, widths)))
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_feedback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.feedback(args.decision, args.label == "good")
    print(
        f"decision {result['decision']} labelled {'good' if result['satisfied'] else 'bad'}; Q is now {result['q']:.2f}"
    )
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ok = client.reload()["reloaded"]
    print("reloaded" if ok else "reload rejected: the configuration is invalid (see the daemon's log)")
    return 0 if ok else 2


def cmd_config_show(args: argparse.Namespace) -> int:
    from locod.daemon.config import as_dict

    config = _config(args)
    data = as_dict(config)
    if args.json:
        _print_json(data)
        return 0
    print(f"# effective configuration (from {data.pop('source')}, then LOCOD_* and --set overrides)")
    for section, values in data.items():
        scalars = {k: v for k, v in values.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
        print(f"\n[{section}]")
        for key, value in scalars.items():
            print(f"{key} = {json.dumps(value)}")
        for key, items in values.items():
            if key in scalars:
                continue
            for item in items:
                print(f"\n[[{section}.{key}]]")
                for k, v in item.items():
                    print(f"{k} = {json.dumps(v)}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from locod.daemon.fetch import fetch

    directory = Path(args.dir) if args.dir else _config(args).models_dir
    fetch(args.name, directory, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from locod.daemon.local import resolve_path

    config = _config(args)
    for model in config.local.models:
        path = resolve_path(model, config.models_dir)
        state = "ok" if path.is_file() else "missing"
        default = " (default)" if model.name == config.local.default else ""
        print(f"local  {model.name}{default}  {path}  [{state}]")
    for cloud in config.cloud.models:
        print(f"cloud  {cloud.name}  {cloud.model} at {cloud.base_url}")
    return 0


def cmd_policy_train(args: argparse.Namespace) -> int:
    try:
        from locod.policy.train import main as train_main
    except ImportError as exc:
        raise LocodError(f"training needs the train extra (pip install 'locod[train]'): {exc}") from None
    return train_main(args.train_args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locod", description="Local-cloud LLM daemon for edge devices.")
    parser.add_argument(
        "--config", help="config file (default: $LOCOD_CONFIG, ~/.config/locod/config.toml, /etc/locod/config.toml)"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one config key (after the file and LOCOD_* variables)",
    )
    parser.add_argument("--endpoint", help="daemon endpoint (default: the ipc socket in the runtime dir)")
    parser.add_argument("--secret", help="shared secret for a tcp endpoint")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.set_defaults(func=cmd_serve)
    _add_turn_commands(sub)
    _add_daemon_commands(sub)
    _add_offline_commands(sub)
    return parser


def _add_turn_commands(sub: Any) -> None:
    """``ask`` and ``chat``."""
    for name, func, text in (
        ("ask", cmd_ask, "ask one question and stream the answer"),
        ("chat", cmd_chat, "interactive multi-turn chat"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "ask":
            p.add_argument("prompt")
            p.add_argument("--model", help="answer with this configured model")
            p.add_argument("--attach", action="append", metavar="FILE", help="image or document to attach")
            p.add_argument("--private", action="append", metavar="FILE", help="attachment that never leaves the device")
            p.add_argument("--max-tokens", type=int)
            p.add_argument("--temperature", type=float)
            p.add_argument("--seed", type=int)
            p.add_argument("--json", action="store_true", help="print every frame as JSON")
        p.add_argument("--session", help="session id (keeps the dialogue history)")
        p.add_argument("--force", choices=("local", "cloud"), help="skip routing")
        p.add_argument("-v", "--verbose", action="store_true", help="show where and why each turn ran")
        p.set_defaults(func=func)


def _add_daemon_commands(sub: Any) -> None:
    """What asks a running daemon: ``status``, ``decisions``, ``feedback``, ``reload``."""
    p = sub.add_parser("status", help="device, network, routing and queue state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("decisions", help="recent decision records")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_decisions)

    p = sub.add_parser("feedback", help="label a decision's answer good or bad (trains the router)")
    p.add_argument("decision", type=int)
    p.add_argument("label", choices=("good", "bad"))
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("reload", help="re-read the configuration and the policy")
    p.set_defaults(func=cmd_reload)


def _add_offline_commands(sub: Any) -> None:
    """What works without a daemon: ``config``, ``models``, ``policy``."""
    config = sub.add_parser("config", help="configuration").add_subparsers(required=True, metavar="ACTION")
    p = config.add_parser("show", help="print the effective configuration (no secrets)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_show)

    models = sub.add_parser("models", help="local models").add_subparsers(required=True, metavar="ACTION")
    p = models.add_parser("fetch", help="download and verify a model of the manifest")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    p.add_argument("--dir", help="models directory (default: paths.models_dir)")
    p.set_defaults(func=cmd_models_fetch)
    p = models.add_parser("list", help="configured models and whether their files are present")
    p.set_defaults(func=cmd_models_list)

    policy = sub.add_parser("policy", help="the TMO routing policy").add_subparsers(required=True, metavar="ACTION")
    p = policy.add_parser("train", help="train with RC-PPO and export ONNX (see --help of the action)", add_help=False)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_policy_train)


if __name__ == "__main__":
    sys.exit(main())
