"""What a user sees of the command line: help for every option with its default, a --help that
loads no torch, the spellings people use, and runs that say what they are doing."""

import argparse
import subprocess
import sys

import pytest

from pyro_vae.cli import main, parser

from .idx_files import write_dataset


def subcommands():
    p = parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("name", ["train", "evaluate", "compare", "sample"])
def test_every_option_says_what_it_does_and_its_default(name):
    command = subcommands()[name]
    assert command.description, f"{name} has no description"
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if action.option_strings and not isinstance(action, argparse._StoreTrueAction):
            shown = command._get_formatter()._format_action(action)
            assert "default" in shown, f"{name} {action.option_strings}: the help does not say the default"


def test_the_help_loads_no_torch():
    code = "import sys; from pyro_vae.cli import parser; parser().format_help(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_main_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "evaluate", "compare", "sample"))


@pytest.mark.parametrize("spelling", ["fashion-mnist", "Fashion_MNIST", "fashion_mnist"])
def test_the_usual_spellings_of_fashion_mnist_are_accepted(spelling):
    assert parser().parse_args(["train", "--dataset", spelling]).dataset == "fashion_mnist"


@pytest.mark.slow
def test_a_new_run_is_named_by_its_architecture_and_a_resume_says_where_it_starts(tmp_path, monkeypatch, capsys):
    write_dataset(tmp_path / "data", gz=False, n_train=64, n_test=16)
    monkeypatch.chdir(tmp_path)
    tiny = ["--dataset", "mnist", "--data-dir", "data", "--hidden", "8", "--z-dim", "2", "--batch-size", "32", "--no-progress"]
    assert main(["train", *tiny, "--epochs", "1"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("mnist-bernoulli-mlp-")
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert f"resuming {run} after epoch 1 of 2" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 0  # the saved --epochs: all done
    out = capsys.readouterr().out
    assert "nothing to train: the run has all its 2 epochs; pass --epochs above 2 to train more" in out and "done:" not in out
    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "1", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"pyro-vae: error: cannot resume {run} to 1 epochs: it has trained 2 already; pass --epochs above 2 to train more\n"
    assert captured.out == ""  # not "resuming ..." before the refusal
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("argv,hint", [
    (["evaluate", "runs/x", "--max-test", "100"], "unrecognized arguments: --max-test 100 (see pyro-vae evaluate --help)"),
    (["train", "--bogus"], "unrecognized arguments: --bogus (see pyro-vae train --help)"),
    (["sample", "runs/x", "--epochs", "3"], "unrecognized arguments: --epochs 3 (see pyro-vae sample --help)"),
])
def test_an_option_the_subcommand_lacks_points_to_that_subcommands_help(capsys, argv, hint):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"pyro-vae: error: {hint}\n"
