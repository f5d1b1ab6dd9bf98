"""Issue 24, items 7 to 9: a closed stdout, Ctrl-C and a run still in progress, met by real
processes with real pipes and real signals.

A command whose reader has gone (``| head``) goes on to the end and loses nothing; Ctrl-C ends a
command with exit status 130 and one line that says what was kept; a run whose first epoch is
still going is reported as in progress, not as stopped.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.cli import main

from .idx_files import write_dataset

TINY = ["--dataset", "mnist", "--hidden", "16", "--z-dim", "2", "--batch-size", "32", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
CLI = [sys.executable, "-m", "pyro_vae.cli"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "idx"
    write_dataset(root, gz=True, n_train=128, n_test=32)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A one-epoch run (in this process)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--no-progress", "--epochs", "1", "--data-dir", str(data), "--run-dir", str(run)]) == 0
    return run


def ctrl_c_as_in_a_terminal():
    """In the child: SIGINT's default action, which Python turns into KeyboardInterrupt (a shell
    starting pytest in the background would have the child ignore it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(argv) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=ctrl_c_as_in_a_terminal)


def epochs_saved(run: Path) -> int:
    return len(torch.load(run / "checkpoint.pt", weights_only=True)["metrics"])


# ----------------------------------------------------------------- 7: a reader that goes away


@pytest.mark.slow
def test_train_piped_into_head_goes_on_to_its_last_epoch(tmp_path, data):
    run = tmp_path / "run"
    train = start(["train", *TINY, "--epochs", 3, "--data-dir", data, "--run-dir", run])
    first = [train.stdout.readline() for _ in range(3)]  # head -3: the run folder, the data, the device
    train.stdout.close()  # the reader is gone: the step and epoch lines meet a closed pipe
    err = train.stderr.read()
    assert train.wait(timeout=300) == 0, err
    assert first[0] == f"run folder: {run}\n"
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert epochs_saved(run) == 3
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_evaluate_with_its_reader_gone_writes_its_results_without_a_traceback(tmp_path, trained):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    evaluate = start(["evaluate", run, "--num-samples", 4, "--idata-points", 2, "--no-progress"])
    evaluate.stdout.close()  # gone before the first line is printed
    err = evaluate.stderr.read()
    assert evaluate.wait(timeout=300) == 0, err
    assert err == ""
    assert json.loads((run / "evaluation.json").read_text())["epochs"] == 1


# ----------------------------------------------------------------------------------- 8: Ctrl-C


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_says_start_again_not_resume(tmp_path):
    data, run = tmp_path / "idx", tmp_path / "run"
    write_dataset(data, gz=True, n_train=3000, n_test=8)
    train = start(["train", *TINY, "--batch-size", 1, "--epochs", 1, "--data-dir", data, "--run-dir", run])
    while not train.stdout.readline().startswith("step:"):  # the first step is done: in the first epoch
        assert train.poll() is None, train.stderr.read()
    train.send_signal(signal.SIGINT)
    err = train.stderr.read()
    assert train.wait(timeout=120) == 130, err
    assert "Traceback" not in err and "--resume --run-dir" not in err, err
    assert "interrupted in the first epoch, before any checkpoint: start the run again with the same command" in err
    assert sorted(files(run)) == ["config.json"]  # nothing to resume; the same command starts afresh
    from pyro_vae import TrainConfig
    from pyro_vae.run import RunFolder

    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()), "config.json")
    assert RunFolder(run).is_fresh_for(config)


INTERRUPT_THE_SECOND_SAVE = """
import os, signal, sys
from pyro_vae import cli
from pyro_vae.train import Trainer

save = Trainer.save

def save_and_press_ctrl_c(self):
    if len(self.metrics) == 2:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the second epoch's checkpoint is being written
    save(self)

Trainer.save = save_and_press_ctrl_c
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_during_a_save_keeps_the_epoch_it_names(tmp_path, data):
    run = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", 3, "--data-dir", data, "--run-dir", run]  # progress on: the epoch lines
    done = subprocess.run([sys.executable, "-c", INTERRUPT_THE_SECOND_SAVE, *map(str, argv)], capture_output=True, text=True,
                          env=ENV, timeout=300, preexec_fn=ctrl_c_as_in_a_terminal)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == f"interrupted after 2 epochs; continue with: pyro-vae train --resume --run-dir {run}"
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("epoch")] == ["1", "2"], done.stdout
    assert epochs_saved(run) == 2 and len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "config.json").read_text())["epochs"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_ctrl_c_ends_evaluate_and_compare_with_one_line_and_their_files_as_they_were(tmp_path, trained, command):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    before = files(run)
    if command == "evaluate":
        victim = start(["evaluate", run, "--num-samples", 1000000, "--chunk-size", 100, "--no-progress"])
        while not (run / ".lock").exists() or (run / ".lock").read_text().strip() != str(victim.pid):  # evaluating
            assert victim.poll() is None, victim.stderr.read()
    else:
        victim = start(["compare", run, "--repeats", 100000, "--no-progress"])
        assert victim.stdout.readline().endswith("test images\n")  # the title: comparing
    victim.send_signal(signal.SIGINT)
    err = victim.stderr.read()
    assert victim.wait(timeout=120) == 130, err
    assert err == f"pyro-vae: {command} interrupted; the files it had not finished writing are as they were\n"
    assert files(run) == before


# ------------------------------------------------------------------ 9: a run in its first epoch


@pytest.mark.slow
def test_a_run_in_its_first_epoch_is_in_progress_for_evaluate_sample_and_compare(tmp_path, capsys):
    data, run = tmp_path / "idx", tmp_path / "run"
    write_dataset(data, gz=True, n_train=20000, n_test=8)  # an epoch of seconds, even on a fast machine
    train = start(["train", *TINY, "--batch-size", 1, "--epochs", 1, "--data-dir", data, "--run-dir", run])
    try:
        while not train.stdout.readline().startswith("step:"):  # in the first epoch
            assert train.poll() is None, train.stderr.read()
        for argv in (["evaluate", run], ["sample", run, "--out", tmp_path / "s.png"], ["compare", run]):
            capsys.readouterr()
            assert main([str(a) for a in argv]) == 2
            err = capsys.readouterr().err
            assert err == (f"pyro-vae: error: {run} has no checkpoint yet: its run is in progress, in its first epoch "
                           f"(process {train.pid} is training it); try again once that epoch has ended\n")
        assert train.poll() is None  # left to train
    finally:
        train.kill()
        train.wait()
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2  # its trainer gone, the run is one that stopped
    assert "the run stopped before its first epoch ended" in capsys.readouterr().err


@pytest.fixture
def python_sigint():
    """SIGINT handled as Python handles it by default, whatever this process inherited (a test run
    started in the background by a shell inherits it ignored); the inherited handler restored after."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_a_deferred_interrupt_comes_after_the_block_and_an_ignored_one_never(python_sigint):
    """Real SIGINTs to this process: raised once the block is done, not inside it; and where SIGINT
    is ignored (a background job, nohup) the block leaves it ignored."""
    from pyro_vae.runtime import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")
    assert done == ["after the signal"]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, reported
def test_an_interrupt_python_swallowed_in_a_weakref_callback_is_raised_at_the_next_check(python_sigint):
    """A real SIGINT that lands inside a weakref callback: Python prints "Exception ignored" and goes
    on (CI saw a training run finish with exit status 0 this way); the watch raises it at the next
    check, and leaves the previous handler in place when the loop ends."""
    import weakref

    from pyro_vae.runtime import InterruptWatch

    class Node:
        pass

    def interrupted_in_callback(ref):
        os.kill(os.getpid(), signal.SIGINT)  # delivered in here, where Python ignores what it raises

    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt), InterruptWatch() as interrupts:
        interrupts.check()  # nothing received: no raise
        node = Node()
        ref = weakref.ref(node, interrupted_in_callback)
        del node  # runs the callback, which swallows the KeyboardInterrupt
        reached.append(ref() is None)
        interrupts.check()
        reached.append("after the check")
    assert reached == [True]
    assert signal.getsignal(signal.SIGINT) is before
