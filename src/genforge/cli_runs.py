"""`genforge runs list|compare` and `genforge report`: looking across runs (parse -> call -> print).

Kept apart from cli.py, like cli_app.py; `build_parser` there calls `add_runs_commands`.
"""

from __future__ import annotations

import argparse

from rich.console import Console


def cmd_runs_list(a: argparse.Namespace) -> None:
    from genforge.jobs.runs import list_runs, runs_table

    summaries = list_runs(a.dir)
    if not summaries:
        print(f"no runs in {a.dir}")
        return
    Console().print(runs_table(summaries, a.dir))


def cmd_runs_compare(a: argparse.Namespace) -> None:
    from genforge.jobs.runs import compare_runs, comparison_table

    result = compare_runs(a.runs, out=a.out)
    Console().print(comparison_table(result))
    print(f"curves: {result.plot}")


def cmd_report(a: argparse.Namespace) -> None:
    from genforge.common.errors import RunError
    from genforge.jobs.runs import render_report_html

    if a.html:
        print(f"wrote {render_report_html(a.run, out=a.out)}")
        return
    if a.out:
        raise RunError("report: --out goes with --html (genforge report RUN --html --out FILE)")
    from pathlib import Path

    from rich.markdown import Markdown

    report = Path(a.run) / "report.md"
    if not report.is_file():
        raise RunError(f"{a.run} has no report.md; `genforge train` writes one (and eval adds to it)")
    Console().print(Markdown(report.read_text(encoding="utf-8")))


def add_runs_commands(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="list and compare training runs").add_subparsers(
        dest="runs_command", required=True)
    ls = runs.add_parser("list", help="a table of the runs in a folder (name, family, steps, best val loss, "
                         "wall time, dataset, created), oldest first")
    ls.add_argument("dir", nargs="?", default="runs", help="folder holding the runs (default: runs)")
    ls.set_defaults(func=cmd_runs_list)
    co = runs.add_parser("compare", help="final/best of each shared metric, and loss curves overlaid in a PNG")
    co.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or names under runs/)")
    co.add_argument("--out", default=None, metavar="PNG",
                    help="curve plot (default: compare-A-B.png beside the first run)")
    co.set_defaults(func=cmd_runs_compare)

    rp = sub.add_parser("report", help="show a run's report.md, or render it to one self-contained HTML file")
    rp.add_argument("run")
    rp.add_argument("--html", action="store_true", help="write HTML with plots and samples embedded")
    rp.add_argument("--out", default=None, metavar="FILE", help="HTML file (default: RUN/report.html)")
    rp.set_defaults(func=cmd_report)
