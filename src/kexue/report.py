"""Write study results as a report folder: ``results.json``, ``results.md``, PNG figures and ``index.html``.

The HTML page needs nothing but the folder (no CDN, no script). The folder is built under a temporary name
beside the target and swapped in at the end, so a reader never sees a half-written report and rerunning into
the same folder replaces it whole.
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .studies.base import Result, Table

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.verdict{display:inline-block;padding:.15em .6em;border-radius:.3em;font-weight:600;color:#fff}
.holds{background:#2a7d2a}.does-not-hold{background:#b03030}.partly-holds{background:#b07a10}
.not-tested,.failed{background:#777}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
.meta{color:#555;font-size:.9em}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.claim{background:#f7f7fb;border-left:4px solid #88a;padding:.5em .8em}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in t.rows)
    cap = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    return f"<h4>{html.escape(t.name)}</h4><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _json_default(o: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(o, (torch.Tensor, np.ndarray)):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def environment() -> dict[str, Any]:
    """The machine and versions a report was produced on."""
    import torch

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 0
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    from . import __version__

    env["kexue"] = __version__
    return env


def render_markdown(results: Sequence[Result], meta: dict[str, Any]) -> str:
    """A Markdown summary of the report (verdicts and tables)."""
    lines = [f"# kexue report ({meta.get('mode', '')})", "",
             f"Command: `{meta.get('command', '')}`  ", f"Machine: {meta.get('machine', '')}  ",
             f"Total time: {meta.get('total_time_s', 0):.0f} s", ""]
    lines += ["| study | article | verdict | time (s) |", "|---|---|---|---:|"]
    for r in results:
        lines.append(f"| {r.study} | {r.article} | {r.verdict} | {r.wall_time_s:.0f} |")
    for r in results:
        lines += ["", f"## {r.title} (`{r.study}`)", "", f"*Claim.* {r.claim}", "",
                  f"*Verdict: {r.verdict}.* {r.verdict_detail}", ""]
        for t in r.tables:
            lines += [f"**{t.name}**" + (f" — {t.caption}" if t.caption else ""), "", t.to_markdown(), ""]
    return "\n".join(lines) + "\n"


def render_html(results: Sequence[Result], meta: dict[str, Any]) -> str:
    """The report page. Figures are referenced relative to the page (``figures/NAME.png``)."""
    esc = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>kexue report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>kexue — reproduction report</h1>",
             f"<p class='meta'>Mode <b>{esc(str(meta.get('mode', '')))}</b> · command <code>"
             f"{esc(str(meta.get('command', '')))}</code> · {esc(str(meta.get('date', '')))} · total "
             f"{meta.get('total_time_s', 0):.0f} s<br>Machine: {esc(str(meta.get('machine', '')))}</p>",
             "<table><thead><tr><th>study</th><th>article</th><th>verdict</th><th>time (s)</th></tr></thead><tbody>"]
    for r in results:
        cls = r.verdict.replace(" ", "-")
        parts.append(f"<tr><td><a href='#{esc(r.study)}'>{esc(r.study)}</a></td><td>{esc(r.article)}</td>"
                     f"<td><span class='verdict {cls}'>{esc(r.verdict)}</span></td><td>{r.wall_time_s:.0f}</td></tr>")
    parts.append("</tbody></table>")
    for r in results:
        cls = r.verdict.replace(" ", "-")
        parts += [f"<h2 id='{esc(r.study)}'>{esc(r.title)}</h2>",
                  f"<p class='meta'>Study <code>{esc(r.study)}</code> · {esc(r.article)} · mode {esc(r.mode)} · "
                  f"{r.wall_time_s:.1f} s</p>",
                  f"<div class='claim'><b>Claim.</b> {esc(r.claim)}</div>",
                  f"<p><span class='verdict {cls}'>{esc(r.verdict)}</span> {esc(r.verdict_detail)}</p>"]
        parts += [_table_html(t) for t in r.tables]
        for f in r.figures:
            name = Path(f.path).name
            parts.append(f"<figure><img src='figures/{esc(name)}' alt='{esc(f.name)}'>"
                         f"<figcaption>{esc(f.caption)}</figcaption></figure>")
        if r.notes:
            parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in r.notes) + "</ul>")
        parts.append("<details><summary>data and configuration</summary><pre>"
                     + esc(json.dumps({"data": r.data, "config": r.config}, indent=2, default=_json_default))
                     + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


_REPORT_FILES = frozenset({"figures", "index.html", "results.json", "results.md"})


def _check_replaceable(out_dir: Path) -> None:
    """Raise ValueError unless ``out_dir`` is absent, an empty folder or an earlier report (only the files a
    report holds, and its ``results.json``): replacing it must never delete anything else."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a folder; give a new folder or an earlier report")
    names = {p.name for p in out_dir.iterdir()}
    if names and (not names <= _REPORT_FILES or "results.json" not in names):
        extra = sorted(names - _REPORT_FILES)[:5] or ["(no results.json)"]
        raise ValueError(f"out_dir {str(out_dir)!r} holds files that are not a kexue report "
                         f"({', '.join(extra)}); it would be replaced whole, so give a new folder or an earlier "
                         "report")


class ReportBuilder:
    """Builds a report in a temporary folder beside ``out_dir``; :meth:`commit` swaps it into place.

    ``out_dir`` must be absent, empty or an earlier report (ValueError otherwise), since it is replaced whole.

    >>> import tempfile, pathlib
    >>> from kexue.studies import Result
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "report"
    >>> b = ReportBuilder(out)
    >>> r = Result("demo", "Demo", "article 0", "a claim", "holds", "numbers")
    >>> b.commit([r], {"mode": "quick"}) == out
    True
    >>> sorted(p.name for p in out.iterdir())
    ['figures', 'index.html', 'results.json', 'results.md']
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir).resolve()
        _check_replaceable(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp",
                                             dir=self.out_dir.parent))
        self.fig_dir = self.tmp_dir / "figures"
        self.fig_dir.mkdir()

    def commit(self, results: Sequence[Result], meta: dict[str, Any]) -> Path:
        meta = {**meta, "environment": meta.get("environment") or environment()}
        payload = {"meta": meta, "results": [r.to_dict() for r in results]}
        (self.tmp_dir / "results.json").write_text(json.dumps(payload, indent=2, default=_json_default))
        (self.tmp_dir / "results.md").write_text(render_markdown(results, meta))
        (self.tmp_dir / "index.html").write_text(render_html(results, meta))
        old = None
        _check_replaceable(self.out_dir)    # (again: something may have been put there while the studies ran)
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}-{int(time.time() * 1e6)}"
            os.replace(self.out_dir, old)
        os.replace(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def write_report(results: Sequence[Result], out_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write a report for results whose figures already exist on disk (they are copied into the report)."""
    b = ReportBuilder(out_dir)
    try:
        for r in results:
            for f in r.figures:
                src = Path(f.path)
                if src.is_file() and src.parent.resolve() != b.fig_dir.resolve():
                    shutil.copy2(src, b.fig_dir / src.name)
        return b.commit(results, meta or {})
    except BaseException:
        b.abort()
        raise
