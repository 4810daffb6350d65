"""The ``kexue`` command: ``list``, ``reproduce``, ``bench``, ``train``, ``sample`` and ``seq2seq``.

    kexue list
    kexue reproduce --quick                       # every study, quick mode, report in ./report
    kexue reproduce init orthogonal --full --out report-full --data-dir ../shared/data
    kexue bench linalg attention
    kexue train --task gan --dataset mnist --norm selfmod --checkpoint-dir runs/g
    kexue sample --checkpoint runs/g --out grid.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from ._io import atomic_write, printable


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"kexue: --device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"kexue: --device {name} asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"kexue: --device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return name


def _machine() -> str:
    import torch

    from .report import environment

    env = environment()
    gpu = f", GPU {env['cuda']}" if env["cuda"] else ", no GPU"
    return (f"{platform.machine()} Linux, {env['cpus']} CPU cores (torch threads {torch.get_num_threads()})"
            f"{gpu}; Python {env['python']}, torch {env['torch']}")


def _err(text: str) -> None:
    """One message on stderr; a path that is not UTF-8 in it is shown with ``\\xNN`` escapes."""
    print(printable(text), file=sys.stderr, flush=True)


def _seed(text: str) -> int:
    """``--seed``: an integer in [0, 2**63); the studies add small offsets to it, and torch takes < 2**64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {value}")
    return value


def cmd_list(args: argparse.Namespace) -> int:
    from .bench import load_all as load_benches
    from .data import DATASETS, where
    from .studies import load_all

    studies = load_all()
    print("Studies (kexue reproduce NAME):")
    for spec in sorted(studies.values(), key=lambda s: (s.article, s.name)):
        print(f"  {spec.name:<12} article {spec.article}  {spec.title}")
        print(f"  {'':<12} quick ≤ {spec.quick_budget_s:.0f} s on 2 CPU cores; full: {spec.full_time}; "
              f"data: {', '.join(spec.datasets) or 'generated'}")
    print("\nDatasets (resolution: --data-dir / KEXUE_DATA_DIR -> ~/.cache/kexue -> download):")
    for name, spec in DATASETS.items():
        print(f"  {name:<16} {printable(where(name, args.data_dir)):<58} {spec.description}")
    print("\nBenchmarks (kexue bench NAME):")
    for name in sorted(load_benches()):
        print(f"  {name}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import torch

    from .report import ReportBuilder, environment
    from .studies import STUDIES, StudyContext, load_all, run_study
    from .studies.base import Result

    load_all()
    names = args.studies or sorted(STUDIES, key=lambda n: (STUDIES[n].article, n))
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        print(f"kexue: unknown study {', '.join(unknown)}; known: {', '.join(sorted(STUDIES))}", file=sys.stderr)
        return 2
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        _err(f"kexue: --data-dir {args.data_dir} is not a folder")
        return 2
    mode = "full" if args.full else "quick"
    device = _resolve_device(args.device)
    torch.manual_seed(args.seed)
    try:
        builder = ReportBuilder(args.out)
    except ValueError as exc:
        _err(f"kexue: --out: {exc}")
        return 2
    except OSError as exc:
        _err(f"kexue: --out {args.out}: cannot write there ({exc.strerror or exc})")
        return 2
    for note in builder.notes:
        _err(f"kexue: --out: {note}")
    runs_dir = None
    if not args.no_resume and (args.full or args.runs_dir):
        from .data.registry import cache_dir

        runs_dir = Path(args.runs_dir) if args.runs_dir else cache_dir() / "runs"
    results: list[Result] = []
    failed = []
    t_start = time.perf_counter()
    print(f"kexue reproduce: {len(names)} stud{'y' if len(names) == 1 else 'ies'} ({mode}) on {device} "
          f"-> {printable(str(builder.out_dir))}", flush=True)
    if runs_dir is not None:
        print(f"finished runs are kept in {printable(str(runs_dir))} and reused on a rerun (--no-resume "
              "recomputes them)", flush=True)
    for i, name in enumerate(names, 1):
        spec = STUDIES[name]
        budget = f"quick budget {spec.quick_budget_s:.0f} s" if mode == "quick" else f"full: {spec.full_time}"
        print(f"[{i}/{len(names)}] {name} (article {spec.article}; {budget}) ...", flush=True)
        ctx = StudyContext(mode=mode, seed=args.seed, device=device, data_dir=args.data_dir,
                           fig_dir=builder.fig_dir, progress=not args.no_progress, runs_dir=runs_dir)
        t0 = time.perf_counter()
        try:
            result = run_study(name, ctx)
        except KeyboardInterrupt:
            builder.abort()
            raise
        except Exception as exc:  # a failing study is reported, the others still run
            failed.append(name)
            tb = traceback.format_exc()
            _err(tb)
            result = Result(study=name, title=spec.title, article=f"article {spec.article}",
                            claim="(study failed before reporting its claim)", verdict="not tested",
                            verdict_detail=f"the study raised {type(exc).__name__}: {exc}",
                            notes=[tb[-2000:]], wall_time_s=time.perf_counter() - t0, mode=mode)
        results.append(result)
        print(printable(f"    {result.verdict}: {result.verdict_detail[:300]}  ({result.wall_time_s:.1f} s)"),
              flush=True)
    total = time.perf_counter() - t_start
    meta = {
        "mode": mode, "seed": args.seed, "device": device, "studies": names,
        "command": "kexue " + " ".join(shlex.quote(a) for a in args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(), "total_time_s": total, "failed": failed, "environment": environment(),
        "data_dir": args.data_dir or os.environ.get("KEXUE_DATA_DIR"),
    }
    try:
        out = builder.commit(results, meta)
    except ValueError as exc:  # --out changed while the studies ran; the report is kept elsewhere
        _err(f"kexue: --out: {exc}")
        return 2
    print(f"report: {printable(str(out / 'index.html'))} ({total:.0f} s in all)")
    if failed:
        print(f"kexue: {len(failed)} stud{'y' if len(failed) == 1 else 'ies'} failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BENCH_GROUPS, BenchOptions, format_header, format_row, load_all

    benches = load_all()
    names = args.names or sorted(benches)
    unknown = [n for n in names if n not in benches]
    if unknown:
        print(f"kexue: unknown benchmark {', '.join(unknown)}; known: {', '.join(sorted(benches))}",
              file=sys.stderr)
        return 2
    only = None
    if args.only is not None:
        only = tuple(g.strip() for g in args.only.split(",") if g.strip())
        known = sorted({g for n in names for g in BENCH_GROUPS.get(n, ())})
        bad = [g for g in only if g not in known] if only else ["(none given)"]
        if bad:
            print(f"kexue: --only: unknown row group {', '.join(bad)} for {', '.join(names)}; known: "
                  f"{', '.join(known) or '(these benchmarks have no row groups)'}", file=sys.stderr)
            return 2
    opts = BenchOptions(device=_resolve_device(args.device), quick=args.quick, only=only)
    print(f"machine: {_machine()}")
    out = {}
    for name in names:
        t0 = time.perf_counter()
        print(format_header(name), flush=True)
        rows = []
        for row in benches[name](opts):       # printed as measured: a run cut short keeps what it printed
            rows.append(row)
            print(format_row(row), flush=True)
        print(f"({time.perf_counter() - t0:.1f} s)\n", flush=True)
        out[name] = [r.to_dict() for r in rows]
    if args.json:
        payload = json.dumps({"machine": _machine(), "benchmarks": out}, indent=2).encode()
        atomic_write(args.json, lambda f: f.write(payload))
    return 0


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .train.__main__ import main as train_main

    return int(train_main(rest, prog="kexue train") or 0)


def cmd_seq2seq(rest: list[str]) -> int:
    from .train.seq2seq_cli import main as seq2seq_main

    return int(seq2seq_main(rest, prog="kexue seq2seq") or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kexue", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kexue {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("list", help="studies, datasets (and where each resolves), benchmarks")
    pl.add_argument("--data-dir", default=None, help="folder holding the datasets (default: $KEXUE_DATA_DIR)")

    pr = sub.add_parser("reproduce", help="run studies and write a report (HTML + PNG + JSON)")
    pr.add_argument("studies", nargs="*", help="study names (default: all; see `kexue list`)")
    g = pr.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small, fast configuration (the default)")
    g.add_argument("--full", action="store_true", help="the full configuration (see `kexue list` for times)")
    pr.add_argument("--data-dir", default=None, help="folder holding the datasets (default: $KEXUE_DATA_DIR)")
    pr.add_argument("--out", default="report",
                    help="report folder, replaced atomically; must be new, empty or an earlier report (which "
                         "kexue recognises by its .kexue-report marker), and not the current folder or one "
                         "holding it (default: report)")
    pr.add_argument("--seed", type=_seed, default=0, help="base random seed, 0 to 2**63 - 1 (default: 0)")
    pr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    pr.add_argument("--no-progress", action="store_true", help="hide progress bars")
    pr.add_argument("--runs-dir", default=None,
                    help="where finished training runs are stored so an interrupted study resumes (default with "
                         "--full: $KEXUE_CACHE_DIR/runs or ~/.cache/kexue/runs; quick mode stores nothing unless "
                         "this is given)")
    pr.add_argument("--no-resume", action="store_true", help="recompute every run, ignoring stored ones")

    pb = sub.add_parser("bench", help="time our pieces against the peers, side by side")
    pb.add_argument("names", nargs="*", help="benchmark names (default: all)")
    pb.add_argument("--quick", action="store_true", help="smaller sizes")
    pb.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    pb.add_argument("--json", default=None, help="also write the rows to this JSON file")
    pb.add_argument("--only", default=None, metavar="GROUPS",
                    help="comma-separated row groups to run (attention: eager, control, model, backward, fused, "
                         "compiled, flex); default: all")

    sub.add_parser("train", help="train an image classifier (runs under torchrun too); "
                                 "`kexue train --help` for options", add_help=False)

    ps = sub.add_parser("sample", help="draw a grid of samples from a GAN checkpoint (`kexue train --task gan`; "
                                       "`kexue train --task gan --help` for its options)")
    ps.add_argument("--checkpoint", required=True, help="a GAN checkpoint.pt, or the folder holding it")
    ps.add_argument("--out", required=True, help="the PNG file to write")
    ps.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    ps.add_argument("--nrow", type=int, default=None, help="images per row (default: about square)")
    ps.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    ps.add_argument("--labels", default=None, help="conditional G: comma-separated class labels, cycled")
    ps.add_argument("--no-ema", action="store_true", help="use the trained G instead of its EMA")
    sub.add_parser("seq2seq", help="fine-tune a BERT into a seq2seq model with the UniLM mask, and generate; "
                                   "`kexue seq2seq --help` for options", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and any(a.split("=")[0] == "--task" for a in argv[1:]):  # --task gan | classify
        from .train.gan_cli import main as gan_main
        from .train.gan_cli import split_task

        task, rest = split_task(argv[1:])
        return int(gan_main(rest) or 0) if task == "gan" else cmd_train(argparse.Namespace(), rest)
    if argv[:1] == ["train"]:
        return cmd_train(argparse.Namespace(), argv[1:])
    if argv[:1] == ["seq2seq"]:
        return cmd_seq2seq(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "list":
        return cmd_list(args)
    if args.command == "reproduce":
        return cmd_reproduce(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "sample":
        from .train.gan_cli import cmd_sample

        return cmd_sample(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
