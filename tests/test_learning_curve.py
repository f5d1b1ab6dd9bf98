"""benchmarks/learning_curve.py, run as a user runs it, on run folders written here: which runs get
the published anchors, the hours panel from times.jsonl, and a clear refusal of a folder with no epochs."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_curve.py"
PROTOCOL = {"dataset": "fashion_mnist", "likelihood": "bernoulli", "binarize": "dynamic"}


def write_run(folder: Path, config: dict, epochs: int, timed: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": e, "train_elbo": -300.0 + 10 * e, "test_elbo": -302.0 + 10 * e} for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if timed:
        times = [{"epoch": e, "seconds": 60.0, "threads": 1, "device": "cpu"} for e in range(1, epochs + 1)]
        (folder / "times.jsonl").write_text("".join(json.dumps(t) + "\n" for t in times))
    return folder


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def learning_curve_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import learning_curve
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return learning_curve


def anchor_lines(ax):
    return [line for line in ax.get_lines() if line.get_color() == "black"]


def test_anchors_only_where_every_run_is_on_the_published_protocol(tmp_path):
    learning_curve = learning_curve_module()
    on = write_run(tmp_path / "on", PROTOCOL, epochs=3, timed=True)
    off = write_run(tmp_path / "off", {**PROTOCOL, "likelihood": "continuous_bernoulli"}, epochs=3, timed=True)
    assert len(anchor_lines(learning_curve.learning_curves_figure([on]).axes[0])) == 3
    figure = learning_curve.learning_curves_figure([on, off])
    assert anchor_lines(figure.axes[0]) == [] and "continuous_bernoulli" in figure.get_suptitle()


def test_every_run_is_drawn_and_only_fully_timed_runs_get_hours(tmp_path):
    learning_curve = learning_curve_module()
    runs = [write_run(tmp_path / f"run{i}", PROTOCOL, epochs=3 + i, timed=i % 2 == 0) for i in range(5)]
    by_epoch, by_hour = learning_curve.learning_curves_figure(runs).axes
    assert [line.get_label() for line in by_epoch.get_lines()][:5] == [f"run{i}: test ELBO" for i in range(5)]
    drawn = [line for line in by_hour.get_lines() if line not in anchor_lines(by_hour)]
    assert [list(line.get_xdata())[-1] for line in drawn] == [3 / 60, 5 / 60, 7 / 60]  # 60 s an epoch
    assert by_hour.get_title() == "no epoch times kept for: run1, run3"


def test_the_command_writes_the_figure(tmp_path):
    runs = [write_run(tmp_path / f"run{i}", PROTOCOL, epochs=3 + i, timed=i % 2 == 0) for i in range(5)]
    out = tmp_path / "curve.png"
    done = run_script(*runs, "--out", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"written: {out}"
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (1320, 616)  # 12 x 5.6 inches at 110 dpi


def test_a_folder_without_epochs_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "curve.png"
    done = run_script(empty, "--out", out)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"learning_curve.py: error: {empty} has no epochs in metrics.jsonl; pass a run folder pyro-vae train wrote"
    assert not out.exists()
