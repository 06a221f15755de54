"""The benchmark suite runs end to end: one tiny workload, shmpool and
multiprocessing only (no Ray, joblib or matplotlib needed), and writes its
files."""

from __future__ import annotations

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_suite_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    benchmarks_main = pytest.importorskip("benchmarks.__main__")
    from benchmarks import workloads

    tiny = workloads.Sizes(results=((4, 1 << 20),))
    monkeypatch.setattr(workloads, "QUICK", tiny)
    status = benchmarks_main.main(["--quick", "--only", "W1", "--peers", "shmpool,mp-fork",
                                   "--repeats", "1", "--out", str(tmp_path)])

    assert status == 0                               # nothing left behind
    results = json.loads((tmp_path / "results.json").read_text())
    (figure,) = results["figures"]
    assert set(figure["peers"]) == {"shmpool", "mp-fork"}
    assert all("seconds" in cell for cell in figure["peers"].values()), figure["peers"]
    assert "W1 4 × 1 MiB results" in (tmp_path / "results.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "chart.png").stat().st_size > 0


TINY = dict(results=((2, 1 << 20),), arguments=((2, 1 << 20),), map_items=100, async_tasks=20,
            sequential=10, queue_items=(2, 1 << 20), rounds=10, chain=(2, 1 << 20))


@pytest.mark.parametrize("name, peers", [
    ("pool", {"shmpool", "mp-fork", "cf-executor"}),
    ("executor", {"shmpool-executor", "mp-fork", "cf-executor"}),
    ("queue", {"shmpool-queue", "mp-queue", "shmpool-simplequeue", "mp-simplequeue"}),
])
def test_per_area_script_runs_the_suites_figures(name, peers, tmp_path, monkeypatch, capfd):
    monkeypatch.syspath_prepend(str(ROOT))
    area = pytest.importorskip("benchmarks.area")
    from benchmarks import workloads

    monkeypatch.setattr(workloads, "QUICK", workloads.Sizes(**TINY))
    status = area.main(name, ["--quick", "--repeats", "1", "--out", str(tmp_path)])

    assert status == 0                               # nothing left behind
    results = json.loads((tmp_path / "results.json").read_text())
    assert {f["group"] for f in results["figures"]} == set(area.AREAS[name].groups)
    for figure in results["figures"]:
        assert set(figure["peers"]) == peers
        assert all("seconds" in cell for cell in figure["peers"].values()), figure
    assert f"python -m benchmarks.bench_{name}" in capfd.readouterr().out
