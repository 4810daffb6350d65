"""Write study results as a report folder: ``results.json``, ``results.md``, PNG figures and ``index.html``.

The HTML page needs nothing but the folder (no CDN, no script). The folder is built under a temporary name
beside the target and swapped in at the end, so a reader never sees a half-written report and rerunning into
the same folder replaces it whole. A report carries a ``.kexue-report`` marker listing its files and their
sha256; only such a folder, holding nothing else, is ever replaced. Text that is not valid UTF-8 (a path
given in another encoding) is written with ``\\xNN`` escapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import math
import os
import platform
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ._io import default_mode, printable
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


# What reports written before the marker existed hold (kexue <= 0.x without ``.kexue-report``).
_LEGACY_FILES = frozenset({"figures", "index.html", "results.json", "results.md"})
MARKER = ".kexue-report"
_MARKER_FORMAT = 1
# .kx-old-<tag>-<pid>-<ns>: an earlier report moved aside during the swap; .kx-<tag>-<pid>-XXXXXXXX.tmp: a
# report being built. <tag> is 8 hex digits of the report folder's name, so the names stay short.
_OLD_RE = re.compile(r"^\.kx-old-([0-9a-f]{8})-(\d+)-(\d+)$")
_BUILD_RE = re.compile(r"^\.kx-([0-9a-f]{8})-(\d+)-[a-z0-9_]{8}\.tmp$")


def _name_tag(name: str) -> str:
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still run (True when unsure: nothing of a live process is ever touched)."""
    if pid == os.getpid():
        return True
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _show(path: Path) -> str:
    return repr(printable(str(path)))


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of the report in ``folder``: ``{"files": {relative path: sha256}, "name": ...}``, or None."""
    marker = folder / MARKER
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return None
        data = json.loads(marker.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kexue_report") != _MARKER_FORMAT:
        return None
    files = data.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return None
    return data


def _foreign_entries(folder: Path, files: dict[str, str], dirs: Sequence[str] = ()) -> list[str]:
    """What in ``folder`` the report whose marker lists ``files`` and ``dirs`` did not write (or that changed
    since)."""
    dirs = {d for d in dirs if isinstance(d, str)} | {str(p) for f in files for p in PurePosixPath(f).parents}
    foreign: list[str] = []
    for root, dirnames, filenames in os.walk(folder):
        rel_root = Path(root).relative_to(folder).as_posix()
        rel_root = "" if rel_root == "." else rel_root
        for d in list(dirnames):
            rel = f"{rel_root}/{d}" if rel_root else d
            if Path(root, d).is_symlink() or rel not in dirs:
                foreign.append(rel + ("" if Path(root, d).is_symlink() else "/"))
                dirnames.remove(d)
        for name in filenames:
            rel = f"{rel_root}/{name}" if rel_root else name
            if rel == MARKER:
                continue
            p = Path(root, name)
            try:
                ok = (rel in files and stat.S_ISREG(os.lstat(p).st_mode) and _sha256_file(p) == files[rel])
            except OSError:
                ok = False
            if not ok:
                foreign.append(rel + ("" if rel not in files else " (changed since kexue wrote it)"))
    return sorted(foreign)


def _looks_like_legacy_report(folder: Path, names: list[str]) -> bool:
    """Whether ``folder`` looks like a report written before the marker existed (for the message only: such a
    folder is refused all the same)."""
    if "results.json" not in names or not set(names) <= _LEGACY_FILES:
        return False
    try:
        figures = os.listdir(folder / "figures") if "figures" in names else []
        if not all(n.endswith(".png") for n in figures) or (folder / "results.json").stat().st_size > 1 << 26:
            return False
        data = json.loads((folder / "results.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"meta", "results"} <= set(data)


def _check_not_cwd(out_dir: Path) -> None:
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was deleted: nothing to protect
        return
    if cwd == out_dir or out_dir in cwd.parents:
        raise ValueError(f"out_dir {_show(out_dir)} is the current folder or holds it; the report replaces its "
                         "folder whole, so give a folder outside the one you are in")


def _check_replaceable(out_dir: Path) -> None:
    """Raise ValueError unless ``out_dir`` is absent, an empty folder or an earlier report: a folder holding
    the ``.kexue-report`` marker and nothing but the files that marker lists, unchanged. Replacing it must
    never delete anything else."""
    try:
        st = os.lstat(out_dir)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"out_dir {_show(out_dir)} is a symbolic link; give the folder it points to, or a new "
                         "folder")
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"out_dir {_show(out_dir)} exists and is not a folder; give a new folder or an earlier "
                         "report")
    names = sorted(os.listdir(out_dir))
    if not names:
        return
    marker = _read_marker(out_dir)
    if marker is None:
        if _looks_like_legacy_report(out_dir, names):
            raise ValueError(
                f"out_dir {_show(out_dir)} looks like a report written by an earlier kexue version, before "
                f"reports carried a {MARKER} marker; kexue replaces only a folder it can tell it wrote, so move "
                "or delete that folder yourself, or give another folder")
        raise ValueError(f"out_dir {_show(out_dir)} is not a kexue report (no {MARKER} marker; it holds "
                         f"{', '.join(printable(n) for n in names[:5])}{', ...' if len(names) > 5 else ''}); it "
                         "would be replaced whole, so give a new folder, an empty one or an earlier report")
    foreign = _foreign_entries(out_dir, marker["files"], marker.get("dirs") or ())
    if foreign:
        raise ValueError(f"out_dir {_show(out_dir)} is a kexue report but also holds files that report did not "
                         f"write: {', '.join(printable(n) for n in foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}; it would be replaced whole, so move them out "
                         "first or give another folder")


def _recover(out_dir: Path) -> list[str]:
    """Finish what a killed run left beside ``out_dir``; returns what was done, one line each.

    A kill between the two renames of the swap leaves no ``out_dir`` and the earlier report under a hidden
    name: it is moved back. Earlier reports left hidden beside a present ``out_dir`` (a kill while deleting
    them) and report folders that were being built are deleted, once their process is gone.
    """
    parent, name = out_dir.parent, out_dir.name
    tag = _name_tag(name)
    legacy = re.compile(r"^" + re.escape("." + name) + r"\.old-(\d+)-(\d+)$")
    olds: list[tuple[int, Path, bool]] = []
    builds: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for e in entries:
        m = _OLD_RE.match(e.name)
        if m and m.group(1) == tag and not _pid_alive(int(m.group(2))):
            olds.append((int(m.group(3)), Path(e.path), False))
            continue
        m = legacy.match(e.name)
        if m and not _pid_alive(int(m.group(1))):
            olds.append((int(m.group(2)) * 1000, Path(e.path), True))
            continue
        m = _BUILD_RE.match(e.name)
        if m and m.group(1) == tag and not _pid_alive(int(m.group(2))):
            builds.append(Path(e.path))
    done: list[str] = []
    for b in builds:
        if b.is_dir() and not b.is_symlink():
            shutil.rmtree(b, ignore_errors=True)
            done.append(f"removed {_show(b)}, a report a killed run was building")
    olds = [o for o in olds if o[1].is_dir() and not o[1].is_symlink()]
    olds.sort(key=lambda o: o[0], reverse=True)
    for _, path, is_legacy in olds:
        marker = None if is_legacy else _read_marker(path)
        if not is_legacy and marker is None:
            continue  # not (provably) a report: left alone
        if not os.path.lexists(out_dir):
            os.replace(path, out_dir)
            done.append(f"restored the earlier report {_show(out_dir)} from {_show(path)}, where a killed run "
                        "had moved it")
        elif not is_legacy and not _foreign_entries(path, marker["files"],  # type: ignore[index]
                                                    marker.get("dirs") or ()):  # type: ignore[union-attr]
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {_show(path)}, an earlier report a killed run had replaced but not deleted")
    return done


def _write_text(path: Path, text: str) -> None:
    path.write_bytes(printable(text).encode("utf-8"))


class ReportBuilder:
    """Builds a report in a temporary folder beside ``out_dir``; :meth:`commit` swaps it into place.

    ``out_dir`` must be absent, empty or an earlier report (ValueError otherwise), since it is replaced whole.
    A report is recognised by the ``.kexue-report`` marker it writes, which lists its files with their
    sha256: a folder holding anything else, a changed file, a report from before the marker, the current
    folder or one holding it is refused. What a killed run left beside ``out_dir`` is tidied first (see
    ``notes``): an earlier report moved aside mid-swap is restored, leftovers of dead runs are removed.

    >>> import tempfile, pathlib
    >>> from kexue.studies import Result
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "report"
    >>> b = ReportBuilder(out)
    >>> r = Result("demo", "Demo", "article 0", "a claim", "holds", "numbers")
    >>> b.commit([r], {"mode": "quick"}) == out
    True
    >>> sorted(p.name for p in out.iterdir())
    ['.kexue-report', 'figures', 'index.html', 'results.json', 'results.md']
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        p = Path(os.path.abspath(out_dir))
        if not p.name:
            raise ValueError(f"out_dir {_show(p)} is a file system root; give a folder inside it")
        # the folder's own name is kept (not resolved): a symbolic link there is refused, not followed
        self.out_dir = p.parent.resolve() / p.name
        _check_not_cwd(self.out_dir)
        self.notes: list[str] = _recover(self.out_dir)
        _check_replaceable(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tag = _name_tag(self.out_dir.name)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".kx-{self._tag}-{os.getpid()}-", suffix=".tmp",
                                             dir=self.out_dir.parent))
        with contextlib.suppress(OSError):
            os.chmod(self.tmp_dir, default_mode(directory=True))
        self.fig_dir = self.tmp_dir / "figures"
        self.fig_dir.mkdir()

    def commit(self, results: Sequence[Result], meta: dict[str, Any]) -> Path:
        meta = {**meta, "environment": meta.get("environment") or environment()}
        payload = {"meta": meta, "results": [r.to_dict() for r in results]}
        _write_text(self.tmp_dir / "results.json", json.dumps(payload, indent=2, default=_json_default))
        _write_text(self.tmp_dir / "results.md", render_markdown(results, meta))
        _write_text(self.tmp_dir / "index.html", render_html(results, meta))
        files, dirs = {}, []
        for root, dirnames, filenames in os.walk(self.tmp_dir):
            dirs += [Path(root, d).relative_to(self.tmp_dir).as_posix() for d in dirnames]
            for n in filenames:
                f = Path(root, n)
                if n != MARKER and stat.S_ISREG(os.lstat(f).st_mode):
                    files[f.relative_to(self.tmp_dir).as_posix()] = _sha256_file(f)
        from . import __version__

        marker = {"kexue_report": _MARKER_FORMAT, "kexue": __version__, "name": self.out_dir.name,
                  "dirs": sorted(dirs), "files": dict(sorted(files.items()))}
        _write_text(self.tmp_dir / MARKER, json.dumps(marker, indent=1))
        old = None
        try:
            _check_not_cwd(self.out_dir)
            _check_replaceable(self.out_dir)  # (again: something may have been put there while the studies ran)
        except ValueError as exc:
            # keep the new report where no clean-up looks (a later run would delete a dead run's build folder)
            kept = self.out_dir.parent / f"kexue-report-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            os.replace(self.tmp_dir, kept)
            raise ValueError(f"{exc}. The new report is kept in {_show(kept)}") from None
        if os.path.lexists(self.out_dir):
            old = self.out_dir.parent / f".kx-old-{self._tag}-{os.getpid()}-{time.time_ns()}"
            os.replace(self.out_dir, old)
        try:
            os.replace(self.tmp_dir, self.out_dir)
        except BaseException:
            if old is not None and not os.path.lexists(self.out_dir):
                os.replace(old, self.out_dir)
            raise
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
