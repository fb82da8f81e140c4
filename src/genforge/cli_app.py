"""`genforge rag ...` and `genforge guard ...`: the application layer's commands (parse -> call -> print).

Kept apart from cli.py so each file stays readable; `build_parser` there calls `add_app_commands`.
"""

from __future__ import annotations

import argparse
import json


def _store(a: argparse.Namespace) -> str:
    from genforge.serve.app_config import default_state_dir

    return a.store or str(default_state_dir())


def cmd_rag_ingest(a: argparse.Namespace) -> None:
    from genforge.jobs.rag import ingest

    result = ingest(a.paths, a.index, _store(a), a.embedder, a.chunk_tokens, a.overlap,
                    max_file_bytes=int(a.max_file_mb * 2**20), field=a.field)
    failed = result.pop("failed", [])
    print(f"index {a.index} in {_store(a)}")
    for k, v in result.items():
        print(f"  {k}: {v:.1f}" if isinstance(v, float) else f"  {k}: {v}")
    for item in failed:
        print(f"  not indexed: {item['source']}: {item['reason']}")


def cmd_rag_query(a: argparse.Namespace) -> None:
    from genforge.jobs.rag import query

    for rank, hit in enumerate(query(a.index, a.question, _store(a), k=a.k, mode=a.mode,
                                     reranker_path=a.reranker), 1):
        first = (hit["text"].strip().splitlines() or [""])[0]
        heading = f" [{hit['heading']}]" if hit.get("heading") else ""
        print(f"{rank}. {hit['score']:.4f}  {hit['source']}#{hit['position']}{heading}\n   {first[:160]}")


def cmd_rag_eval(a: argparse.Namespace) -> None:
    from genforge.jobs.rag import eval_table, evaluate

    result = evaluate(a.index, a.questions, _store(a), show=False)
    print(eval_table(result))
    default = result.get("default_mode")
    if default:
        print(f"default mode of {a.index} is now {default} (best nDCG@5)")


def cmd_guard_scan(a: argparse.Namespace) -> None:
    from genforge.common.errors import ConfigError
    from genforge.data.jsonl import read_records
    from genforge.jobs.guard import scan_texts
    from genforge.models.embeddings import Embedder
    from genforge.serve.guard import Guard

    if (a.text is None) == (a.jsonl is None):
        raise ConfigError("guard scan: give a TEXT or --jsonl FILE (one of them)")
    if a.text is not None:
        texts = [a.text]
    else:
        rows = [row for _, row in read_records(a.jsonl, "input file")]
        missing = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get(a.field), str)), None)
        if missing is not None:
            raise ConfigError(f"{a.jsonl}: line {missing} has no text field {a.field!r} (choose one with --field)")
        texts = [r[a.field] for r in rows]
    guard = Guard("log", injection_threshold=a.threshold, embedder=None if a.rules_only else Embedder(a.embedder))
    for out in scan_texts(texts, guard):
        print(json.dumps(out, ensure_ascii=False))


def cmd_guard_train(a: argparse.Namespace) -> None:
    from genforge.jobs.guard import train_injection_detector, write_labelled_sets
    from genforge.serve.injection import DETECTOR_PATH

    paths = write_labelled_sets(a.data_dir)
    out = a.out or DETECTOR_PATH
    detector = train_injection_detector(paths["injection"], out=out)
    print(f"detector written to {out} (threshold {detector.threshold:.4f})")


def add_app_commands(sub: argparse._SubParsersAction) -> None:
    rag = sub.add_parser("rag", help="document indexes for retrieval-augmented generation").add_subparsers(
        dest="rag_command", required=True)
    store_help = "postgresql://... or a folder (default: ~/.cache/genforge/serve-state, as genforge serve)"

    ing = rag.add_parser("ingest", help="chunk, embed and index txt/md/html/pdf/jsonl files, folders, builtin:pydoc")
    ing.add_argument("paths", nargs="+")
    ing.add_argument("--index", required=True)
    ing.add_argument("--store", default=None, help=store_help)
    ing.add_argument("--embedder", default=None, metavar="DIR", help="sentence-transformers folder")
    ing.add_argument("--chunk-tokens", type=int, default=200)
    ing.add_argument("--overlap", type=int, default=40)
    ing.add_argument("--max-file-mb", type=float, default=50.0)
    ing.add_argument("--field", default="text", help="text field of .jsonl records")
    ing.set_defaults(func=cmd_rag_ingest)

    qu = rag.add_parser("query", help="the top chunks of an index for a question")
    qu.add_argument("index")
    qu.add_argument("question")
    qu.add_argument("--k", type=int, default=5)
    qu.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default=None,
                    help="default: the mode `rag eval` measured best for this index (else hybrid)")
    qu.add_argument("--store", default=None, help=store_help)
    qu.add_argument("--reranker", default=None, metavar="DIR", help="a local cross-encoder folder")
    qu.set_defaults(func=cmd_rag_query)

    ev = rag.add_parser("eval", help="hit@1/3/5, MRR, nDCG@5 per mode on a question file; sets the default mode")
    ev.add_argument("index")
    ev.add_argument("--questions", required=True, help="JSONL: question + topic (or source)")
    ev.add_argument("--store", default=None, help=store_help)
    ev.set_defaults(func=cmd_rag_eval)

    guard = sub.add_parser("guard", help="prompt-injection and PII scanning").add_subparsers(
        dest="guard_command", required=True)
    sc = guard.add_parser("scan", help="one JSON line per input: injection, injection_score, pii, redacted")
    sc.add_argument("text", nargs="?", default=None)
    sc.add_argument("--jsonl", default=None, metavar="FILE")
    sc.add_argument("--field", default="text", help="text field of the --jsonl records")
    sc.add_argument("--threshold", type=float, default=None, help="injection score threshold (default: detector's)")
    sc.add_argument("--embedder", default=None, metavar="DIR")
    sc.add_argument("--rules-only", action="store_true", help="no learned detector (no embedding model load)")
    sc.set_defaults(func=cmd_guard_scan)

    tr = guard.add_parser("train", help="write the labelled sets and retrain the injection detector")
    tr.add_argument("--data-dir", default="benchmarks/data")
    tr.add_argument("--out", default=None, help="detector file (default: the packaged one)")
    tr.set_defaults(func=cmd_guard_train)
