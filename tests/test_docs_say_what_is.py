"""Issue 24, item 14: the documentation, the examples' help and the printed tables say what the
code does (page titles, run-folder names, defaults, units, the widths a run records)."""

import importlib.util
import re
from pathlib import Path

import pytest

from pyro_vae import VAE, ConfigError, TrainConfig
from pyro_vae.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_home_page_lists_every_math_page_under_its_nav_title():
    nav = (ROOT / "mkdocs.yml").read_text().split("  - The math, one question a page:\n")[1].split("\n  - ")[0]
    pages = re.findall(r"^      - (.*): (math/\S+\.md)$", nav, re.M)
    assert {path for _, path in pages} == {f"math/{p.name}" for p in (ROOT / "docs" / "math").glob("*.md")}
    home = (ROOT / "docs" / "index.md").read_text()
    assert re.findall(r"^\* \[(.*)\]\((math/\S+\.md)\)", home, re.M) == pages


def test_no_page_names_a_run_folder_the_way_train_no_longer_does():
    # train names a run runs/<dataset>-<likelihood>-<architecture>-<time>
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for name in re.findall(r"runs/[a-z_]+-[a-z_]+-<time>", path.read_text()):
            pytest.fail(f"{path.relative_to(ROOT)} names the run folder {name}, without its architecture")


def test_the_site_wraps_long_code_lines_and_table_cells():
    styles = re.findall(r"^extra_css:\n((?:  - .*\n)+)", (ROOT / "mkdocs.yml").read_text(), re.M)[0]
    css = "".join((ROOT / "docs" / line.strip()[2:]).read_text() for line in styles.splitlines())
    assert re.search(r"pre > code \{[^}]*white-space: pre-wrap", css)
    assert re.search(r"td,\s*\.md-typeset table:not\(\[class\]\) th \{[^}]*overflow-wrap: anywhere", css)


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_the_examples_help_gives_each_default_once(example, capsys):
    spec = importlib.util.spec_from_file_location(example.stem, example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    options = " ".join(capsys.readouterr().out.split("options:")[1].split())
    entries = re.split(r" (?=--[a-z])", options)
    assert len(entries) > 3
    for entry in entries:
        assert entry.count("default") <= 1 and "None" not in entry, entry


def test_the_conv_networks_refuse_widths_they_would_not_use(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"one dense layer: give one hidden width \(--hidden 64\), got 3 \(64 32 16\)"):
        VAE(architecture="conv", hidden=(64, 32, 16))
    run = tmp_path / "run"
    assert main(["train", "--architecture", "conv", "--hidden", "64", "32", "16", "--run-dir", str(run), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("pyro-vae: error: the conv networks have one dense layer")
    assert not run.exists()  # refused before the run folder (and its config.json) was written
    assert TrainConfig(architecture="conv", hidden=(64,)).hidden == (64,)


def test_compare_says_the_units_of_its_table(capsys, tmp_path):
    argv = ["compare", "--estimators", "trace", "--particles", "1", "--repeats", "2", "--num-data", "4", "--no-progress",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.split()[:2] == ["estimator", "num_particles"])
    assert out[header + 2] == ("units: loss_mean and loss_std are nats summed over the batch of 4 (loss = -bound); "
                               "bound_per_datapoint, bound_se and gap_to_log_px are nats per datapoint")
