"""`screener`: run the node, look at its state, re-send results, replay a folder."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from screener import config, logs
from screener.errors import UserError


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="config.toml (default: ./config.toml if present)")
    p.add_argument("--var", dest="var_dir", help="spool and database folder (overrides node.var_dir)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="screener", description="Cervical spine radiograph screening node")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the DICOM node")
    _add_config(s)
    s.add_argument("--port", type=int, help="listening port (default 11112)")
    s.add_argument("--ae-title", help="our AE title (default CSPINE)")
    s.add_argument(
        "--destination",
        action="append",
        default=[],
        metavar="AET@HOST:PORT",
        help="where SRs are sent (repeatable; replaces the configured destinations)",
    )
    st = sub.add_parser("status", help="counts per state, failures, engines")
    _add_config(st)
    r = sub.add_parser("resend", help="re-queue failed studies (all, or the given Study Instance UIDs)")
    _add_config(r)
    r.add_argument("study_uid", nargs="*")
    rp = sub.add_parser("replay", help="re-run a folder of DICOM files offline (audit)")
    rp.add_argument("folder", type=Path)
    rp.add_argument("--out", type=Path, help="audit folder (default FOLDER-audit)")
    rp.add_argument("--config", type=Path, default=None)
    rp.add_argument("--labels", type=Path, help="CSV: sop_instance_uid or file, then a 0/1 column per engine")
    rp.add_argument("--engines", nargs="+", help="engines to run (default: engines.enabled in the config)")
    rp.add_argument(
        "--backend", choices=("auto", "tensorrt", "torch", "onnx-int8", "onnx-fp32"), help="override engines.backend"
    )
    rp.add_argument("--compare", type=Path, metavar="OLD_AUDIT", help="report what changed against an earlier audit")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    rp.set_defaults(var_dir=None)
    c = sub.add_parser("complete", help="screen a study now instead of waiting for study_stable_s")
    _add_config(c)
    c.add_argument("study_uid", nargs="+")
    d = sub.add_parser("demo", help="send a synthetic study (lateral + two obliques) to the running node")
    _add_config(d)
    d.add_argument("--host", help="the node's address (default: 127.0.0.1)")
    d.add_argument("--port", type=int, help="the node's DICOM port (default: node.port)")
    d.add_argument("--calling-aet", default="DEMO", help="our AE title (default DEMO)")
    d.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the result (default 120)")
    cc = sub.add_parser("check-config", help="validate config.toml (and folders, TLS files) without starting")
    _add_config(cc)
    ro = sub.add_parser("route", help="which routing rule and engines each DICOM file gets, and why")
    _add_config(ro)
    ro.add_argument("files", nargs="+", type=Path)
    return p


def load_settings(args: argparse.Namespace) -> config.Settings:
    path = args.config
    if path is None and Path("config.toml").is_file():
        path = Path("config.toml")
    settings = config.load(path)
    dests = [config.parse_destination(d) for d in getattr(args, "destination", []) or []]
    return config.with_overrides(
        settings,
        port=getattr(args, "port", None),
        ae_title=getattr(args, "ae_title", None),
        var_dir=args.var_dir,
        destinations=dests or None,
    )


def cmd_check_config(settings: config.Settings, path: Path | None) -> int:
    config.check_environment(settings)
    engines_dir = Path(settings.engines.dir)
    missing = [n for n in settings.engines.enabled if not (engines_dir / n / "manifest.json").is_file()]
    if missing:  # serve would refuse to start (it also verifies every file's hash)
        raise config.ConfigError(
            f"engines.enabled: no engine {', '.join(missing)} in {engines_dir} "
            "(build it with `trainer build-engine`, `make demo-engines` for demo engines, or disable it)"
        )
    node, tls = settings.node, settings.tls
    listeners = [] if (tls.listen and not tls.plain_listener) else [f"plain on port {node.port}"]
    if tls.listen:
        listeners.append(f"TLS on port {tls.port}")
    print(f"{path or 'defaults'}: OK")
    print(f"  node {node.ae_title}: {', '.join(listeners)}; var {node.var_dir}")
    print(f"  engines: {', '.join(settings.engines.enabled) or 'none'}; routing rules: {len(settings.routing)}")
    print(f"  destinations: {', '.join(str(d) for d in settings.destinations) or 'none'}")
    return 0


def cmd_serve(settings: config.Settings) -> int:
    from screener.node import Node
    from screener.privacy import make_tree_private

    config.check_environment(settings)
    make_tree_private(Path(settings.node.var_dir))
    node = Node(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node.start()
    except OSError as exc:
        node.store.close()
        raise UserError(f"cannot listen on {settings.node.host}:{settings.node.port}: {exc.strerror or exc}") from None
    print(f"screener: {settings.node.ae_title} listening on port {node.port}; Ctrl-C to stop", file=sys.stderr)
    if node.http is not None:
        print(f"screener: status page {node.http.url} (health: /healthz /readyz, metrics: /metrics)", file=sys.stderr)
    try:
        node.wait(stop)
    finally:
        # Stop accepting first, finish the batch in flight, within schedule.stop_timeout_s.
        clean = node.stop()
    if not clean:
        sys.stderr.flush()
        os._exit(0)  # a job is still busy: everything committed is durable, the rest resumes at start
    return 0


def cmd_status(settings: config.Settings) -> int:
    from screener.engine.manifest import load as load_manifest
    from screener.engine.runtime import choose_backend
    from screener.store import Store

    var = Path(settings.node.var_dir)
    if not (var / "screener.db").is_file():
        print(f"no node state in {var} yet (start it with `screener serve`)")
    else:
        store = Store.open(var, recover=False)
        try:
            counts = store.counts()
            for kind, per_state in counts.items():
                line = ", ".join(f"{k} {v}" for k, v in sorted(per_state.items())) or "none"
                print(f"{kind}: {line}")
            problems = store.check_invariants()
            print("state machine invariants: " + ("ok" if not problems else f"{len(problems)} VIOLATED"))
            for line in problems[:20]:
                print(f"  {line}")
            failures = store.failures(20)
            if failures:
                print("failures:")
                for f in failures:
                    dest = f" -> {f.destination}" if f.destination else ""
                    print(f"  {f.kind} {f.uid}{dest}: {f.state}: {f.reason}")
        finally:
            store.close()
    print("engines:")
    for name in settings.engines.enabled:
        folder = Path(settings.engines.dir) / name
        try:
            man = load_manifest(folder, verify=True)
            b = choose_backend(man, settings.engines.backend)
            flags = ("validated" if man.validated else "NOT validated") + (", demo" if man.demo else "")
            print(
                f"  {name}: version {man.version}, backend {b.name}, "
                f"threshold {man.threshold.value if man.threshold else '-'}"
                f", {flags}"
            )
        except UserError as exc:
            print(f"  {name}: NOT LOADABLE: {exc}")
    return 0


def cmd_resend(settings: config.Settings, uids: list[str]) -> int:
    from screener.store import Store

    store = Store.open(Path(settings.node.var_dir), recover=False)
    try:
        # One transaction per study: the current SR's failed deliveries again, a superseded SR's never,
        # a study that failed before its SR back to screening (docs/state-machine.md).
        targets: list[str | None] = list(uids) or [None]
        n = sum(store.resend(uid) for uid in targets)
    finally:
        store.close()
    print(f"re-queued {n} item(s); a running node picks them up on its next pass")
    return 0


def cmd_replay(settings: config.Settings, args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from screener import replay as rp
    from screener.node import load_engines
    from screener.screening import Screener

    folder = args.folder
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    eng = dataclasses.replace(
        settings.engines,
        enabled=list(args.engines or settings.engines.enabled),
        backend=args.backend or settings.engines.backend,
    )
    settings = dataclasses.replace(settings, engines=eng)
    engines = load_engines(settings)
    out = args.out or folder.with_name(folder.name.rstrip("/") + "-audit")
    screener = Screener(
        engines, settings.routing, settings.schedule.batch_max_size, settings.pipeline, limits=settings.limits
    )
    summary = rp.replay(folder, out, screener, engines, chunk=settings.schedule.batch_max_size, progress=not args.quiet)
    print(
        f"{summary.files} files: {summary.screened} screened, {summary.skipped} skipped, {summary.failed} failed; "
        f"{summary.srs} SR(s); audit in {out}"
    )
    rows = json.loads((out / "audit.json").read_text())
    if args.labels:
        for name, path in rp.labels_report(out, rows, rp.read_labels(args.labels), engines).items():
            print(f"labels report for {name}: {path}")
    if args.compare:
        if not (args.compare / "audit.json" if args.compare.is_dir() else args.compare).is_file():
            raise UserError(f"--compare {args.compare}: no audit.json there")
        diff = rp.compare(args.compare, rows)
        (out / "compare.json").write_text(json.dumps(diff, indent=2) + "\n")
        print(
            f"compared {diff['compared']} results with {args.compare}: {len(diff['findings_flipped'])} finding(s) "
            f"flipped, max probability drift {diff['max_probability_drift']:.3g}, "
            f"{len(diff['only_in_old'])} only in old, {len(diff['only_in_new'])} only in new "
            f"(details: {out / 'compare.json'})"
        )
    return 0


def cmd_complete(settings: config.Settings, uids: list[str]) -> int:
    from screener.store import Store

    store = Store.open(Path(settings.node.var_dir), recover=False)
    try:
        unknown = 0
        for uid in uids:
            study = store.get_study(uid)
            if study is None:
                unknown += 1
                print(f"{uid}: unknown study (nothing received with this Study Instance UID)")
            elif store.force_complete(uid):
                print(f"{uid}: complete")
            else:
                print(f"{uid}: {study.state}, not receiving (unchanged)")
    finally:
        store.close()
    return 1 if unknown else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("serve", "replay"):
        from screener.privacy import apply_private_umask

        apply_private_umask()  # spool, database (+ WAL/SHM), SRs and audit files: 0600 / 0700
    try:
        settings = load_settings(args)
        logs.configure(settings.logging.renderer, settings.logging.level)
        if args.command == "check-config":
            path = args.config or (Path("config.toml") if Path("config.toml").is_file() else None)
            return cmd_check_config(settings, path)
        if args.command == "serve":
            return cmd_serve(settings)
        if args.command == "status":
            return cmd_status(settings)
        if args.command == "resend":
            return cmd_resend(settings, args.study_uid)
        if args.command == "replay":
            return cmd_replay(settings, args)
        if args.command == "complete":
            return cmd_complete(settings, args.study_uid)
        if args.command == "demo":
            from screener.http import demo

            logs.configure(settings.logging.renderer, "warning")  # its own lines, not the store's state log
            demo.run(settings, args.host, args.port, args.calling_aet, args.wait, config_path=args.config)
            return 0
        if args.command == "route":
            from screener.routing import explain_file

            unreadable = 0
            for f in args.files:
                line = explain_file(str(f), settings.routing, settings.limits)
                unreadable += ": failed: " in line
                print(line)
            return 1 if unreadable else 0
    except UserError as exc:
        print(f"screener: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
