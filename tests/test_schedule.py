"""Issue 23, item 2: what a recipe needs in training. A learning-rate schedule, a validation split
carved from the training set, the validation ELBO every epoch, the best model kept, early stopping,
and resumes that repeat the uninterrupted run exactly with all of it."""

import json

import pytest
import torch

from pyro_vae import ConfigError, TrainConfig, load_run
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.cli import main
from pyro_vae.data import held_out, load_dataset
from pyro_vae.run import split_batches
from pyro_vae.schedule import best_epoch, epochs_without_improvement, learning_rate
from pyro_vae.train import Trainer, train

from .idx_files import write_dataset

SMALL = dict(dataset="mnist", hidden=(32,), z_dim=2, batch_size=32, max_test=64)
NO_MANIFOLD = {**SMALL, "z_dim": 3}  # z_dim 2 draws two more figures every epoch


@pytest.fixture
def data_dir(tmp_path):
    write_dataset(tmp_path / "data", gz=True, n_train=320, n_test=64)
    return str(tmp_path / "data")


def rows(*val_elbos):
    return [{"epoch": i + 1, "val_elbo": v} for i, v in enumerate(val_elbos)]


# ------------------------------------------------------------------ the schedule, as functions of the metrics


def test_the_plateau_schedule_is_torchs_reduce_on_plateau_on_the_validation_elbo():
    """The yardstick is torch's own ReduceLROnPlateau (mode max, no threshold, cooldown or eps): its
    ``patience`` counts the bad epochs it tolerates, ours those that lower the rate, one more."""
    values = torch.Generator().manual_seed(0)
    elbos = (torch.randn(60, generator=values).cumsum(0) * 0.3 - torch.linspace(0, -5, 60)).tolist()
    for patience in (1, 3, 5):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=0.1)
        torch_schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.5, patience=patience - 1, threshold=0.0, cooldown=0, eps=0.0
        )
        for done in range(len(elbos) + 1):
            assert learning_rate("plateau", 0.1, 0.5, patience, rows(*elbos[:done])) == pytest.approx(
                optimizer.param_groups[0]["lr"], rel=1e-12
            )
            if done < len(elbos):
                torch_schedule.step(elbos[done])
    assert learning_rate("plateau", 0.1, 0.5, 1, rows(*elbos)) < 0.1  # the sequence has plateaus: it did drop


def test_exponential_and_constant_rates_and_the_best_epoch():
    assert learning_rate("exponential", 0.2, 0.9, 10, [{}] * 3) == pytest.approx(0.2 * 0.9**3, rel=1e-15)
    assert learning_rate("constant", 0.2, None, 10, rows(-3.0, -2.0)) == 0.2
    assert best_epoch(rows()) is None and epochs_without_improvement(rows()) == 0
    assert best_epoch(rows(-5.0, -2.0, -2.0, -3.0)) == 2  # the first of ties
    assert epochs_without_improvement(rows(-5.0, -2.0, -2.0, -3.0)) == 2
    with pytest.raises(ValueError, match="without a validation split"):
        best_epoch([{"epoch": 1, "train_elbo": -1.0}])


# ------------------------------------------------------------------ settings that cannot go together


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"lr_schedule": "plateau"}, "--lr-schedule plateau watch the validation ELBO: add --validation-size"),
        ({"early_stopping": 5}, "--early-stopping watch the validation ELBO: add --validation-size"),
        ({"lr_decay": 0.5}, "--lr-decay is for --lr-schedule exponential or plateau"),
        ({"lr_schedule": "exponential", "lr_decay": 1.5}, r"lr_decay must be a number in \(0, 1\)"),
        ({"lr_schedule": "cosine"}, "unknown lr_schedule 'cosine'"),
        ({"validation_size": -1}, "validation_size"),
    ],
)
def test_schedule_settings_that_cannot_work_are_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**settings).validate()


def test_the_cli_refuses_lr_patience_without_the_plateau_schedule_in_one_line(tmp_path, capsys):
    argv = ["train", "--lr-schedule", "exponential", "--lr-patience", "3", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "pyro-vae: error: --lr-patience is for --lr-schedule plateau; this run's lr_schedule is exponential: leave "
        "--lr-patience out\n"
    )
    assert not (tmp_path / "run").exists()


def test_a_validation_split_larger_than_the_training_set_is_refused_before_anything_is_written(tmp_path, data_dir):
    config = TrainConfig(epochs=1, data_dir=data_dir, max_train=100, validation_size=100, **SMALL)
    with pytest.raises(Exception, match="a validation split of 100 images leaves no training images out of 100"):
        Trainer(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_schedule_settings_of_an_old_run_default_to_what_it_did():
    """A config.json written before these settings existed loads as a constant-rate run without
    validation, with the same identity as before (so it resumes)."""
    old = TrainConfig().to_dict()
    for name in ("lr_schedule", "lr_decay", "lr_patience", "validation_size", "early_stopping"):
        old.pop(name)
    config = TrainConfig.from_dict(old)
    assert (config.lr_schedule, config.lr_decay, config.validation_size, config.early_stopping) == (
        "constant",
        None,
        0,
        None,
    )
    assert config.identity() == TrainConfig().identity()
    assert "lr_patience" not in config.identity()  # read by the plateau schedule only


# ------------------------------------------------------------------ the validation split


def test_the_validation_split_is_carved_from_the_training_set_by_the_seed(data_dir):
    dataset = load_dataset("mnist", data_dir)
    config = TrainConfig(data_dir=data_dir, validation_size=80, likelihood="discretized_logistic", **SMALL)
    train_split, validation = (split_batches(config, dataset, s, torch.device("cpu")) for s in ("train", "validation"))
    as_rows = lambda levels: {tuple(row.tolist()) for row in (levels * 255).round().to(torch.uint8).flatten(1)}  # noqa: E731
    train_rows, validation_rows = as_rows(train_split.levels()), as_rows(validation.levels())
    assert (len(train_rows), len(validation_rows)) == (240, 80)  # the generated images are distinct
    assert not train_rows & validation_rows
    assert train_rows | validation_rows == as_rows(dataset.train_images / 255)  # the training set, no test image
    again = held_out(320, 80, config.seed)
    other = held_out(320, 80, config.seed + 1)
    assert torch.equal(again, held_out(320, 80, config.seed)) and not torch.equal(again, other)
    assert int(again.sum()) == 80


# ------------------------------------------------------------------ training with all of it


def validation_elbo(run, data_dir) -> float:
    from pyro_vae.evaluate import mean_elbo

    batches = split_batches(run.config, load_dataset("mnist", data_dir), "validation", torch.device("cpu"))
    return mean_elbo(run.vae, batches.eval_batches(), run.config.seed)


def test_early_stopping_keeps_the_best_model_and_evaluate_scores_it_by_default(tmp_path, data_dir, capsys):
    config = TrainConfig(epochs=20, data_dir=data_dir, validation_size=64, lr=0.3, early_stopping=1, **NO_MANIFOLD)
    metrics = train(config, tmp_path / "run", progress=False)
    best = best_epoch(metrics)
    assert len(metrics) == best + 1 < 20, "the run must stop early for this test to mean anything"
    assert all("val_elbo" in row and "lr" not in row for row in metrics)  # constant rate: not repeated per row
    best_run, last_run = load_run(tmp_path / "run", "cpu"), load_run(tmp_path / "run", "cpu", model="last")
    assert (best_run.model, best_run.model_epoch, last_run.model, last_run.model_epoch) == (
        "best",
        best,
        "last",
        len(metrics),
    )
    # each model scores on the validation split what training recorded for its epoch, to the bit
    assert validation_elbo(best_run, data_dir) == metrics[best - 1]["val_elbo"]
    assert validation_elbo(last_run, data_dir) == metrics[-1]["val_elbo"]
    argv = ["train", "--resume", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0  # nothing to train: it stopped early, and says so
    assert f"nothing to train: stopped early after epoch {len(metrics)}: 1 epoch without a better" in (
        capsys.readouterr().out
    )
    assert main(["evaluate", str(tmp_path / "run"), "--num-samples", "4", "--no-progress"]) == 0
    assert f"best model: after epoch {best} of {len(metrics)}" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert (record["model"], record["model_epoch"], record["epochs"]) == ("best", best, len(metrics))
    assert main(["evaluate", str(tmp_path / "run"), "--model", "last", "--num-samples", "4", "--no-progress"]) == 0
    assert "the last model's, beside the default model's evaluation.json" in capsys.readouterr().out
    last_record = json.loads((tmp_path / "run" / "evaluation-last.json").read_text())  # beside, never over, the best's
    assert (last_record["model"], last_record["model_epoch"]) == ("last", len(metrics))
    for model in ("best", "last"):  # each model's grid in its own file
        assert main(["sample", str(tmp_path / "run"), "--model", model, "--num", "4"]) == 0
    assert {"samples-seed0-n4-best.png", "samples-seed0-n4-last.png"} <= {p.name for p in (tmp_path / "run").iterdir()}
    argv = ["train", "--resume", "--run-dir", str(tmp_path / "run"), "--validation-size", "32"]
    assert main(argv) == 2
    assert "(validation_size: 64 in the checkpoint, 32 now); leave --validation-size out to resume it as trained, " \
        "or start a new --run-dir" in capsys.readouterr().err


def test_a_run_without_validation_has_no_best_model(tmp_path, data_dir, capsys):
    train(TrainConfig(epochs=1, data_dir=data_dir, **SMALL), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "best.pt").exists()
    assert main(["evaluate", str(tmp_path / "run"), "--model", "best"]) == 2
    assert capsys.readouterr().err == (
        f"pyro-vae: error: {tmp_path / 'run'} was trained without a validation split, so it has no best model; use "
        "--model last\n"
    )
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "run"), "--epochs", "2", "--early-stopping", "3"]) == 2
    assert capsys.readouterr().err == (
        f"pyro-vae: error: cannot resume {tmp_path / 'run'} with --early-stopping: it was trained without a validation "
        "split; start a new --run-dir with --validation-size N to stop early\n"
    )


def test_a_resume_without_best_pt_says_its_model_is_lost_and_trains_on(tmp_path, data_dir, capsys):
    """best.pt deleted: the resume says on one line that the best epoch's model is lost and what
    evaluate needs, and trains on; when no later epoch beats that one, the run ends saying so, and
    evaluate is refused by default naming --model last. Nothing else is lost."""
    run = tmp_path / "run"
    base = ["--dataset", "mnist", "--hidden", "32", "--z-dim", "3", "--batch-size", "32", "--max-test", "64"]
    base += ["--data-dir", data_dir, "--validation-size", "64", "--lr", "0.3", "--seed", "1", "--step", "eager"]
    assert main(["train", *base, "--epochs", "3", "--no-progress", "--run-dir", str(run)]) == 0
    before = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert load_checkpoint(run / "best.pt")["epoch"] == best_epoch(before) == 3
    (run / "best.pt").unlink()
    capsys.readouterr()

    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "4", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    value = f"{before[2]['val_elbo']:.2f}"
    assert err == (
        f"pyro-vae: warning: {run / 'best.pt'} is missing: the model of epoch 3, the best validation ELBO so far "
        f"({value}), is lost unless you put that file back; until a later epoch beats it, evaluate, sample and "
        "compare need --model last\n"
    )
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[:3] == before and len(metrics) == 4  # trained on
    assert best_epoch(metrics) == 3, "epoch 4 must not beat epoch 3 for this test to mean anything"
    assert not (run / "best.pt").exists()
    assert f"best validation ELBO {value} at epoch 3 (test ELBO {metrics[2]['test_elbo']:.2f}): its model is lost " \
        "(best.pt is missing): evaluate, sample and compare need --model last" in out
    assert main(["train", "--resume", "--run-dir", str(run), "--early-stopping", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert f"nothing to train: stopped early after epoch 4: 1 epoch without a better validation ELBO than epoch 3's " \
        f"({value}), whose model is lost (best.pt is missing)" in out and "the model of epoch 3" in err
    assert main(["evaluate", str(run), "--num-samples", "2", "--no-progress"]) == 2
    assert f"{run} has no best.pt (deleted?); use --model last" in capsys.readouterr().err


def test_a_later_epoch_that_beats_the_lost_best_writes_a_new_best_pt(tmp_path, data_dir):
    config = TrainConfig(epochs=1, data_dir=data_dir, validation_size=64, **NO_MANIFOLD)
    train(config, tmp_path / "run", progress=False)
    (tmp_path / "run" / "best.pt").unlink()
    with Trainer(None, tmp_path / "run", resume=True, progress=False, changes={"epochs": 2}) as trainer:
        assert trainer.lost_best_epoch == 1 and "the model of epoch 1" in trainer.lost_best_note()
        metrics = trainer.fit()
        assert best_epoch(metrics) == 2, "epoch 2 must beat epoch 1 for this test to mean anything"
        assert trainer.lost_best_epoch is None and trainer.lost_best_note() is None
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2
    assert load_run(tmp_path / "run", "cpu").model_epoch == 2


@pytest.mark.slow
def test_a_resumed_run_with_a_plateau_schedule_repeats_the_uninterrupted_run_exactly(tmp_path, data_dir):
    config = dict(data_dir=data_dir, validation_size=64, lr_schedule="plateau", lr_patience=1, lr=0.3, **NO_MANIFOLD)
    straight = train(TrainConfig(epochs=8, **config), tmp_path / "straight", progress=False)
    train(TrainConfig(epochs=3, **config), tmp_path / "resumed", progress=False)
    resumed = train(TrainConfig(epochs=8, **config), tmp_path / "resumed", resume=True, progress=False)
    assert resumed == straight  # every float, the rates and the validation ELBOs, to the last bit on CPU
    assert len({row["lr"] for row in straight}) > 1, "the rate must drop for this test to mean anything"
    for name in ("checkpoint.pt", "best.pt"):
        a, b = (load_checkpoint(tmp_path / run / name)["model"] for run in ("straight", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a)
