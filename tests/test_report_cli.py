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
    (out / "stale.txt").write_text("from the previous run")
    write_report([Result("y", "Y", "a", "c", "does not hold", "d")], out, {"mode": "full"})
    assert not (out / "stale.txt").exists() and "Y" in (out / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folders left


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
