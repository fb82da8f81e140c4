"""`genforge registry ...`: push, list, alias and show model versions (parse -> call -> print).

The store is the one `genforge serve` and `genforge rag` use (--store: a folder or postgresql://...);
the files live under --registry-dir ($GENFORGE_REGISTRY_DIR, default ~/.cache/genforge/registry).
"""

from __future__ import annotations

import argparse
import json
import time

from genforge.cli_args import positive_float

STORE_HELP = "postgresql://... shared by replicas, or a folder (default: ~/.cache/genforge/serve-state, as serve)"
ROOT_HELP = "folder of the registry's model files (default: $GENFORGE_REGISTRY_DIR or ~/.cache/genforge/registry)"


def open_registry(store: str | None, registry_dir: str | None):
    """The Registry over --store (default: the embedded store genforge serve uses) and --registry-dir."""
    from genforge.common.registry import Registry
    from genforge.common.store import open_store
    from genforge.serve.app_config import default_state_dir

    return Registry(open_store(store or default_state_dir()), registry_dir)


def cmd_registry_push(a: argparse.Namespace) -> None:
    registry = open_registry(a.store, a.registry_dir)
    try:
        v = registry.push(a.run, a.name)
    finally:
        registry.store.close()
    print(f"pushed {v.ref} from {a.run}: {v.record['files']} files, {v.record['bytes'] / 2**20:.1f} MiB, "
          f"digest {v.digest[:12]}")


def _metric_summary(metrics: dict) -> str:
    keys = [k for k in ("val_loss", "val_ppl", "loss") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys) or "-"


def cmd_registry_list(a: argparse.Namespace) -> None:
    registry = open_registry(a.store, a.registry_dir)
    try:
        if a.name is None:
            names = registry.names()
            if not names:
                print("the registry is empty; push a run with `genforge registry push RUN --name NAME`")
            for name in names:
                versions = registry.versions(name)
                aliases = " ".join(f"{al}->{v}" for al, (v, _) in registry.aliases(name).items())
                print(f"{name}: {len(versions)} version(s), latest {versions[-1].version}"
                      + (f", aliases {aliases}" if aliases else ""))
            return
        versions = registry.versions(a.name)
        if not versions:
            registry.resolve(a.name)  # the NotFoundError that lists the models there are
        by_version: dict[int, list[str]] = {}
        for alias, (v, _) in registry.aliases(a.name).items():
            by_version.setdefault(v, []).append(alias)
        print(f"{'version':>7}  {'pushed (UTC)':19}  {'digest':12}  {'dataset':16}  {'metrics':28}  aliases")
        for v in versions:
            pushed = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.record["created"]))
            dataset = str((v.record.get("dataset") or {}).get("content_hash") or "-")[:16]
            print(f"{v.version:>7}  {pushed:19}  {v.digest[:12]:12}  {dataset:16}  "
                  f"{_metric_summary(v.record.get('metrics') or {}):28}  {', '.join(by_version.get(v.version, []))}")
    finally:
        registry.store.close()


def cmd_registry_alias(a: argparse.Namespace) -> None:
    registry = open_registry(a.store, a.registry_dir)
    try:
        v = registry.set_alias(a.ref, a.alias)
    finally:
        registry.store.close()
    print(f"{v.name}@{a.alias} -> {v.ref}")


def cmd_registry_show(a: argparse.Namespace) -> None:
    registry = open_registry(a.store, a.registry_dir)
    try:
        v = registry.resolve(a.ref)
    finally:
        registry.store.close()
    print(json.dumps({**v.record, "folder": str(v.path)}, indent=2, sort_keys=True, default=str))


def add_serve_registry_flags(se: argparse.ArgumentParser) -> None:
    rg = se.add_argument_group("registry versions (with --model NAME@REF; the store is --store's)")
    rg.add_argument("--canary", default=None, metavar="REF=SHARE%",
                    help="send SHARE percent of requests to another version, e.g. nano@4=10%% (sticky per the "
                    "x-genforge-route-key header, else the request's `user`)")
    rg.add_argument("--shadow", default=None, metavar="REF",
                    help="mirror every request to this version; its answers are logged, never returned")
    rg.add_argument("--shadow-log", default=None, metavar="JSONL",
                    help="where the shadow's answers go (default: REGISTRY_DIR/shadow/NAME@N.jsonl; with "
                    "--shadow-upstream ~/.cache/genforge/shadow/HOST_PORT.jsonl)")
    rg.add_argument("--registry-dir", default=None, metavar="DIR", help=ROOT_HELP)
    rg.add_argument("--follow-interval", type=positive_float, default=None, metavar="SECONDS",
                    help="resolve NAME@ALIAS again every SECONDS, following an alias moved by another replica or "
                    "`genforge registry alias` (default: only on POST /admin/reload)")


def serve_from_registry(a: argparse.Namespace, ref: str, *, app_config, api_keys: list[str], watermark,
                        kv_cache_bytes: int | None, adapters: dict) -> None:
    from genforge.common.errors import ConfigError
    from genforge.serve.versioned_app import serve_versions_forever
    from genforge.serve.versions import parse_canary

    canary = parse_canary(a.canary) if a.canary else None
    if adapters:
        raise ConfigError("--adapter: registry versions are served without LoRA adapters; merge them first "
                          "(`genforge merge`) and push the merged model", param="adapter")
    if a.image_label or a.image_watermark or a.image_watermark_key_file:
        raise ConfigError("--image-label / --image-watermark: registry serving runs language models", param="model")
    if a.served_model_name:
        raise ConfigError("--served-model-name: a registry version is served under its registry name", param="model")
    registry = open_registry(a.store or a.state_dir, a.registry_dir)
    serve_versions_forever(
        registry, ref, host=a.host, port=a.port, shutdown_timeout=a.shutdown_timeout, header_timeout=a.header_timeout,
        keep_alive=a.keep_alive, root_path=a.root_path, http=a.http, loop=a.loop, trace=a.trace, canary=canary,
        shadow=a.shadow, shadow_log=a.shadow_log, max_model_len=a.max_model_len, dtype=a.dtype,
        max_batch_size=a.max_batch_size, max_queue=a.max_queue, api_keys=api_keys,
        decode="eager" if a.enforce_eager else a.decode, request_timeout=a.request_timeout or None,
        body_timeout=a.body_timeout, limit_concurrency=a.limit_concurrency, kv_cache_bytes=kv_cache_bytes,
        stream_interval=a.stream_interval, app_config=app_config, watermark=watermark, label_text=a.label_text,
        follow_interval=a.follow_interval)


def add_registry_commands(sub: argparse._SubParsersAction) -> None:
    reg = sub.add_parser("registry", help="named, immutable model versions and aliases (serve --model NAME@REF)"
                         ).add_subparsers(dest="registry_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=None, metavar="URL|DIR", help=STORE_HELP)
        p.add_argument("--registry-dir", default=None, metavar="DIR", help=ROOT_HELP)

    pu = reg.add_parser("push", help="register a run's model as the next version of NAME (files copied)")
    pu.add_argument("run", help="a run directory (with model/) or a model folder")
    pu.add_argument("--name", required=True)
    common(pu)
    pu.set_defaults(func=cmd_registry_push)

    li = reg.add_parser("list", help="the models, or one model's versions with their metrics and aliases")
    li.add_argument("name", nargs="?", default=None)
    common(li)
    li.set_defaults(func=cmd_registry_list)

    al = reg.add_parser("alias", help="point an alias at a version: `genforge registry alias NAME@3 production`")
    al.add_argument("ref", help="NAME@VERSION (or NAME@latest, NAME@OTHER_ALIAS: resolved now)")
    al.add_argument("alias")
    common(al)
    al.set_defaults(func=cmd_registry_alias)

    sh = reg.add_parser("show", help="one version's record as JSON (recipe, metrics, dataset, digest, folder)")
    sh.add_argument("ref")
    common(sh)
    sh.set_defaults(func=cmd_registry_show)
