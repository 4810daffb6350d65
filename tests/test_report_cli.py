"""Report writing (atomic, offline HTML, JSON) and the command line, using small registered fake studies."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from kexue import cli  # noqa: E402
from kexue.report import ReportBuilder, write_report  # noqa: E402
from kexue.studies import STUDIES, Result, StudyContext, Table, load_all, register_study, run_study  # noqa: E402
from kexue.studies.base import StudySpec  # noqa: E402


@pytest.fixture
def fake_studies(monkeypatch):
    load_all()  # register the real studies first, so restoring the registry afterwards keeps them
    saved = dict(STUDIES)

    def ok(ctx: StudyContext) -> Result:
        fig, ax = plt.subplots()
        ax.plot([0, 1], [ctx.seed, ctx.seed + 1])
        ctx.save_figure(fig, "fake_line", "a line")
        return Result("fake-ok", "A fake study", "article 0", "lines are straight", "holds",
                      f"slope 1 (seed {ctx.seed}, mode {ctx.mode})",
                      tables=[Table("numbers", ["x", "y"], [[1, 2.5], ["<b>", None]])], config={"n": 3})

    def boom(ctx: StudyContext) -> Result:
        raise RuntimeError("deliberate failure")

    STUDIES["fake-ok"] = StudySpec("fake-ok", 0, "A fake study", ok, 1.0, "instant")
    STUDIES["fake-boom"] = StudySpec("fake-boom", 0, "A failing study", boom, 1.0, "instant")
    yield
    STUDIES.clear()
    STUDIES.update(saved)


def test_result_rejects_unknown_verdict():
    with pytest.raises(ValueError, match="verdict"):
        Result("x", "x", "a", "c", "maybe", "d")


def test_run_study_collects_figures_and_time(fake_studies, tmp_path):
    r = run_study("fake-ok", StudyContext(mode="quick", seed=3, fig_dir=tmp_path))
    assert r.mode == "quick" and r.wall_time_s > 0 and r.config["seed"] == 3
    assert [f.name for f in r.figures] == ["fake_line"] and (tmp_path / "fake_line.png").is_file()
    with pytest.raises(ValueError, match="unknown study"):
        run_study("nope", StudyContext())


def test_report_is_written_and_replaced_atomically(fake_studies, tmp_path):
    out = tmp_path / "report"
    b = ReportBuilder(out)
    r = run_study("fake-ok", StudyContext(fig_dir=b.fig_dir))
    b.commit([r], {"mode": "quick", "command": "kexue reproduce"})
    page = (out / "index.html").read_text()
    assert "fake_line.png" in page and "&lt;b&gt;" in page and "http" not in page.replace("http-equiv", "")
    data = json.loads((out / "results.json").read_text())
    assert data["results"][0]["verdict"] == "holds" and data["results"][0]["figures"][0]["file"] == "fake_line.png"
    assert (out / "figures" / "fake_line.png").is_file()
    marker = json.loads((out / ".kexue-report").read_text())
    assert sorted(marker["files"]) == ["figures/fake_line.png", "index.html", "results.json", "results.md"]
    write_report([Result("y", "Y", "a", "c", "does not hold", "d")], out, {"mode": "full"})
    assert not (out / "figures" / "fake_line.png").exists() and "Y" in (out / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folders left


def _report(tmp_path, name="rep"):
    out = tmp_path / name
    assert cli.main(["reproduce", "fake-ok", "--out", str(out), "--no-progress"]) == 0
    return out


def _tree(root):
    return sorted((p.relative_to(root).as_posix(), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.mark.parametrize("kind", ["foreign file", "folder without results.json", "a file", "a link to a report"])
def test_a_report_never_replaces_what_is_not_a_report(fake_studies, tmp_path, capsys, kind):
    """The report folder is replaced whole, so anything but a new folder, an empty one or an earlier report is
    refused before the studies run, and left as it was."""
    out = tmp_path / "target"
    if kind == "a file":
        out.write_text("keep me")
    elif kind == "a link to a report":
        out.symlink_to(_report(tmp_path), target_is_directory=True)
    else:
        (out / "figures").mkdir(parents=True)
        (out / ("notes.txt" if kind == "foreign file" else "index.html")).write_text("keep me")
        if kind == "foreign file":
            (out / "results.json").write_text("{}")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="out_dir"):
        ReportBuilder(out)
    capsys.readouterr()
    assert cli.main(["reproduce", "fake-ok", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kexue: --out") and err.count("\n") == 1          # one line
    assert _tree(tmp_path) == before      # nothing moved, nothing left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["reproduce", "fake-ok", "--out", str(empty), "--no-progress"]) == 0
    assert (empty / "results.json").is_file()
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert cli.main(["reproduce", "fake-ok", "--out", str(blocker / "sub"), "--no-progress"]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_a_users_results_and_figures_are_never_taken_for_a_report(fake_studies, tmp_path, capsys):
    """Issue 18, defect 2: a folder with a results.json and figures/ is not a report unless the report's own
    marker says so, and an earlier report is replaced only while it holds nothing but its own files."""
    thesis = tmp_path / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "results.json").write_text('{"mine": 1}')
    (thesis / "figures" / "thesis_plot.pdf").write_bytes(b"%PDF my thesis")
    (thesis / "results.md").write_text("my notes")
    before = _tree(tmp_path)
    assert cli.main(["reproduce", "fake-ok", "--out", str(thesis), "--no-progress"]) == 2
    assert "not a kexue report" in capsys.readouterr().err and _tree(tmp_path) == before

    rep = _report(tmp_path)
    for where, change in [("figures/thesis_plot.pdf", "add"), ("figures/fake_line.png", "edit"),
                          ("notes.txt", "add"), ("figures/sub/x.png", "add")]:
        path = rep / where
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = path.read_bytes() if path.exists() else None
        path.write_bytes(b"the user's own")
        before = _tree(tmp_path)
        capsys.readouterr()
        assert cli.main(["reproduce", "fake-ok", "--out", str(rep), "--no-progress"]) == 2, where
        err = capsys.readouterr().err
        assert where.split("/")[0] in err and ("changed" in err) == (change == "edit"), err
        assert _tree(tmp_path) == before
        if saved is None:
            path.unlink()
            if path.parent.name == "sub":
                path.parent.rmdir()
        else:
            path.write_bytes(saved)
    (rep / "figures" / "fake_line.png").unlink()          # removing a report's own file is fine
    assert cli.main(["reproduce", "fake-ok", "--out", str(rep), "--no-progress"]) == 0
    (rep / ".kexue-report").write_text("{not json")        # a damaged marker proves nothing
    assert cli.main(["reproduce", "fake-ok", "--out", str(rep), "--no-progress"]) == 2


def test_a_file_added_to_out_while_the_studies_run_is_kept_and_so_is_the_report(fake_studies, tmp_path, capsys):
    rep = _report(tmp_path)

    def meddle(ctx: StudyContext) -> Result:
        (rep / "figures" / "added_meanwhile.pdf").write_bytes(b"mine")
        return Result("fake-meddle", "M", "article 0", "c", "holds", "d")

    STUDIES["fake-meddle"] = StudySpec("fake-meddle", 0, "M", meddle, 1.0, "instant")
    capsys.readouterr()
    assert cli.main(["reproduce", "fake-meddle", "--out", str(rep), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "added_meanwhile.pdf" in err and "The new report is kept in" in err and err.count("\n") == 1
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith("kexue-report-")]
    assert json.loads((kept / "results.json").read_text())["results"][0]["study"] == "fake-meddle"
    assert (rep / "figures" / "added_meanwhile.pdf").read_bytes() == b"mine" and (rep / ".kexue-report").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rep", kept.name])


def test_a_report_from_before_the_marker_is_refused_with_what_to_do(fake_studies, tmp_path, capsys):
    old = _report(tmp_path)
    (old / ".kexue-report").unlink()
    before = _tree(tmp_path)
    assert cli.main(["reproduce", "fake-ok", "--out", str(old), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "earlier kexue version" in err and "move or delete that folder yourself" in err
    assert _tree(tmp_path) == before


def test_out_is_refused_when_it_is_or_holds_the_current_folder(fake_studies, tmp_path, monkeypatch, capsys):
    rep = _report(tmp_path)
    (rep / "figures").chmod(0o755)
    monkeypatch.chdir(rep / "figures")
    before = _tree(tmp_path)
    for out in (".", "..", str(rep), str(rep / "figures"), "../figures"):
        assert cli.main(["reproduce", "fake-ok", "--out", out, "--no-progress"]) == 2, out
        assert "current folder" in capsys.readouterr().err
    assert _tree(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert cli.main(["reproduce", "fake-ok", "--out", ".", "--no-progress"]) == 2
    assert empty.is_dir() and list(empty.iterdir()) == []
    assert cli.main(["reproduce", "fake-ok", "--out", "sub", "--no-progress"]) == 0     # a folder inside is fine
    assert (empty / "sub" / "results.json").is_file()


def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_kill_mid_swap_is_recovered_on_the_next_run(fake_studies, tmp_path, capsys):
    """Issue 18: a kill between the two renames of the swap left no report at --out (the earlier one hidden
    beside it); the next run puts it back, and removes what dead runs left."""
    import os
    import shutil
    import time

    from kexue import report

    rep = _report(tmp_path)
    first = _tree(rep)
    tag, pid = report._name_tag("rep"), _dead_pid()
    hidden = tmp_path / f".kx-old-{tag}-{pid}-{time.time_ns()}"
    os.replace(rep, hidden)                                         # the kill came after the first rename
    (tmp_path / f".kx-{tag}-{pid}-abcdefgh.tmp" / "figures").mkdir(parents=True)   # and its build folder
    live = tmp_path / f".kx-old-{tag}-{os.getpid()}-1"               # a live process's: left alone
    live.mkdir()
    b = ReportBuilder(rep)
    assert any("restored the earlier report" in n for n in b.notes) and _tree(rep) == first
    b.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rep", live.name])
    live.rmdir()
    capsys.readouterr()
    os.replace(rep, hidden)
    assert cli.main(["reproduce", "fake-ok", "--out", str(rep), "--seed", "4", "--no-progress"]) == 0
    assert "restored the earlier report" in capsys.readouterr().err
    assert json.loads((rep / "results.json").read_text())["meta"]["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    # a kill while deleting the replaced report: the leftover is removed once it is checked to be a report
    shutil.copytree(rep, hidden)
    other = tmp_path / f".kx-old-{tag}-{pid}-1"
    shutil.copytree(rep, other)
    (other / "figures" / "mine.txt").write_text("not the report's")     # not provably a report: left alone
    assert cli.main(["reproduce", "fake-ok", "--out", str(rep), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rep", other.name])
    shutil.rmtree(other)
    # the same kill under an earlier version (hidden as .rep.old-PID-TIME): put back, then refused as pre-marker
    (rep / ".kexue-report").unlink()
    os.replace(rep, tmp_path / f".rep.old-{pid}-{int(time.time() * 1e6)}")
    capsys.readouterr()
    assert cli.main(["reproduce", "fake-ok", "--out", str(rep), "--no-progress"]) == 2
    assert "earlier kexue version" in capsys.readouterr().err and (rep / "results.json").is_file()


def test_reports_follow_the_umask(fake_studies, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = _report(tmp_path)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {".": 0o755, "figures": 0o755, "figures/fake_line.png": 0o644, "index.html": 0o644,
                     "results.json": 0o644, "results.md": 0o644, ".kexue-report": 0o644}


def test_a_path_that_is_not_utf8_keeps_the_report(fake_studies, tmp_path, capsys):
    """Issue 18, defect 7: --out rep_\\xff or such a --data-dir ran every study, then lost the report writing
    results.md. Paths are written with \\xNN escapes; results.json keeps the exact name."""
    import os

    def echo(ctx: StudyContext) -> Result:
        return Result("fake-echo", "Echo", "article 0", "c", "holds", f"data dir {ctx.data_dir}",
                      tables=[Table("t", ["dir"], [[ctx.data_dir]])], data={"dir": ctx.data_dir})

    STUDIES["fake-echo"] = StudySpec("fake-echo", 0, "Echo", echo, 1.0, "instant")
    out = os.fsdecode(bytes(tmp_path) + b"/rep_\xff")
    data = os.fsdecode(bytes(tmp_path) + b"/data_\xfe")
    os.mkdir(data)
    assert cli.main(["reproduce", "fake-echo", "fake-ok", "fake-boom", "--out", out, "--data-dir", data,
                     "--no-progress"]) == 1                   # fake-boom fails; the report is written all the same
    captured = capsys.readouterr()
    assert "rep_\\xff" in captured.out
    rep = bytes(tmp_path) + b"/rep_\xff"
    md = open(rep + b"/results.md", "rb").read().decode("utf-8")
    page = open(rep + b"/index.html", "rb").read().decode("utf-8")
    assert "data_\\xfe" in md and "rep_\\xff" in md and "data_\\xfe" in page
    res = json.loads(open(rep + b"/results.json", "rb").read())
    assert os.fsencode(res["meta"]["data_dir"]) == bytes(tmp_path) + b"/data_\xfe"
    assert sorted(os.listdir(bytes(tmp_path))) == [b"data_\xfe", b"rep_\xff"]       # no temporary folder left
    assert cli.main(["reproduce", "fake-ok", "--out", out, "--no-progress"]) == 0     # and it is a report
    os.mkdir(os.path.join(data, "tinyshakespeare"))
    open(os.path.join(data, "tinyshakespeare", "input.txt"), "w").close()
    capsys.readouterr()
    assert cli.main(["list", "--data-dir", data]) == 0 and "data_\\xfe" in capsys.readouterr().out


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**63), "1.5", "x"])
def test_reproduce_seed_is_checked_at_parse_time(fake_studies, tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as info:
        cli.main(["reproduce", "fake-ok", "--out", str(tmp_path / "r"), "--seed", seed])
    assert info.value.code == 2 and "--seed" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_reproduce_largest_seed_runs(fake_studies, tmp_path):
    assert cli.main(["reproduce", "fake-ok", "--out", str(tmp_path / "r"), "--seed", str(2**63 - 1),
                     "--no-progress"]) == 0


def test_cli_reproduce_and_failure_reporting(fake_studies, tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli.main(["reproduce", "fake-ok", "--quick", "--out", str(out), "--seed", "5", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["seed"] == 5 and res["meta"]["mode"] == "quick" and "CPU" in res["meta"]["machine"]
    assert res["results"][0]["verdict_detail"].startswith("slope 1 (seed 5")
    rc = cli.main(["reproduce", "fake-boom", "fake-ok", "--out", str(out), "--no-progress"])
    assert rc == 1
    res = json.loads((out / "results.json").read_text())
    assert [r["verdict"] for r in res["results"]] == ["not tested", "holds"]
    assert "deliberate failure" in res["results"][0]["verdict_detail"]
    assert cli.main(["reproduce", "no-such-study", "--out", str(out)]) == 2
    assert cli.main(["reproduce", "fake-ok", "--data-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_cli_list_and_bench_unknown(capsys):
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    assert "fashion-mnist" in text and "Studies" in text and "Benchmarks" in text
    assert cli.main(["bench", "no-such-bench"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--quick", "--full"])


def test_cli_bench_prints_each_row_as_it_is_measured(monkeypatch, tmp_path, capsys):
    """A bench that yields its rows has each one printed at once: a run cut short keeps what it measured."""
    from kexue.bench import BENCHES, BenchRow

    class Stop(Exception):
        pass

    def fake(opts):
        yield BenchRow("case A", "ours", "peer", 0.002, 0.004, "report only", {"note": "first"})
        print("-- between rows --")
        yield BenchRow("case B", "ours", "peer", 0.003, None, "report only")
        raise Stop

    monkeypatch.setitem(BENCHES, "fake-stream", fake)
    with pytest.raises(Stop):
        cli.main(["bench", "fake-stream", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert out.index("case A") < out.index("note: first") < out.index("-- between rows --") < out.index("case B")
    assert "2.00x" in out                         # case A's speedup (peer / ours)
    assert not (tmp_path / "b.json").exists()     # the JSON is written only for a finished run


def test_cli_bench_only_passes_the_row_groups(monkeypatch, capsys):
    from kexue.bench import BENCH_GROUPS, BENCHES, BenchRow

    seen = []

    def fake(opts):
        seen.append((opts.only, opts.wants("fused"), opts.wants("flex")))
        yield BenchRow("case", "ours", "peer", 0.001, 0.001, "report only")

    monkeypatch.setitem(BENCHES, "fake-groups", fake)
    monkeypatch.setitem(BENCH_GROUPS, "fake-groups", ("eager", "fused", "flex"))
    cli.main(["bench", "fake-groups", "--only", "fused,eager"])
    cli.main(["bench", "fake-groups"])
    assert seen == [(("fused", "eager"), True, False), (None, True, True)]
    capsys.readouterr()
    assert cli.main(["bench", "fake-groups", "--only", "fused,nosuch"]) == 2    # before anything runs
    assert cli.main(["bench", "fake-groups", "--only", ","]) == 2
    assert len(seen) == 2 and "unknown row group nosuch" in capsys.readouterr().err


def test_cli_device_is_checked_before_anything_runs(fake_studies, tmp_path):
    for bad in ("banana", "cuda:x", "meta"):
        with pytest.raises(SystemExit, match="--device"):
            cli.main(["reproduce", "fake-ok", "--out", str(tmp_path / "r"), "--device", bad])
        with pytest.raises(SystemExit, match="--device"):
            cli.main(["bench", "linalg", "--device", bad])
    assert not (tmp_path / "r").exists()


def test_register_study_decorator(fake_studies):
    @register_study("fake-reg", article=9, title="t", quick_budget_s=1, full_time="1 s")
    def run(ctx):
        return Result("fake-reg", "t", "a", "c", "holds", "d")

    assert STUDIES["fake-reg"].article == 9 and STUDIES["fake-reg"].run is run


def test_torch_threads_restores_the_count_even_on_error():
    import torch

    from kexue.studies.base import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def _square(x: int, calls: list[int]) -> dict:
    calls.append(x)
    return {"y": x * x, "list": [x, 0.5]}


def test_cached_run_stores_reuses_and_separates_keys(tmp_path):
    import functools

    calls: list[int] = []
    plain = StudyContext(mode="full")
    assert plain.cached_run({"x": 3}, functools.partial(_square, 3, calls)) == {"y": 9, "list": [3, 0.5]}
    assert plain.cached_run({"x": 3}, functools.partial(_square, 3, calls))["y"] == 9
    assert calls == [3, 3]  # no runs_dir: nothing stored
    ctx = StudyContext(mode="full", runs_dir=tmp_path)
    first = ctx.cached_run({"x": 3}, functools.partial(_square, 3, calls))
    again = ctx.cached_run({"x": 3}, functools.partial(_square, 3, calls))
    assert first == again == {"y": 9, "list": [3, 0.5]} and calls == [3, 3, 3]
    ctx.cached_run({"x": 4}, functools.partial(_square, 4, calls))  # another key runs
    StudyContext(mode="quick", runs_dir=tmp_path).cached_run({"x": 3}, functools.partial(_square, 3, calls))
    assert calls == [3, 3, 3, 4, 3]  # another mode runs too
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 3 and {f.parent.name for f in files} == {"test_report_cli"}
    files[0].write_text("{not json")  # a damaged entry is recomputed, not trusted
    n = len(calls)
    for x, mode in ((3, "full"), (4, "full"), (3, "quick")):
        StudyContext(mode=mode, runs_dir=tmp_path).cached_run({"x": x}, functools.partial(_square, x, calls))
    assert len(calls) == n + 1


def test_cli_full_mode_resumes_from_stored_runs(fake_studies, tmp_path, monkeypatch):
    calls: list[int] = []

    def counted(ctx: StudyContext) -> Result:
        import functools

        vals = [ctx.cached_run({"i": i}, functools.partial(_square, i, calls))["y"] for i in range(3)]
        return Result("fake-runs", "runs", "a", "c", "holds", f"sum {sum(vals)}")

    STUDIES["fake-runs"] = StudySpec("fake-runs", 0, "runs", counted, 1.0, "instant")
    monkeypatch.setenv("KEXUE_CACHE_DIR", str(tmp_path / "cache"))
    args = ["reproduce", "fake-runs", "--full", "--out", str(tmp_path / "rep"), "--no-progress"]
    assert cli.main(args) == 0 and calls == [0, 1, 2]
    assert len(list((tmp_path / "cache" / "runs").rglob("*.json"))) == 3
    assert cli.main(args) == 0 and calls == [0, 1, 2]  # all three reused
    assert cli.main([*args, "--no-resume"]) == 0 and calls == [0, 1, 2] * 2
    assert cli.main(["reproduce", "fake-runs", "--quick", "--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    assert calls == [0, 1, 2] * 3  # quick mode stores nothing by default
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert res["results"][0]["verdict_detail"] == "sum 5"
