"""Issue 12: a run folder that never lies and never loses.

Every bad input or fault below ends in the library's own error (ConfigError, DataError,
NumericalError) or, on the command line, in exactly one stderr line ``pyro-vae: error: ...`` and
exit status 2; and every file that was in the run folder before (and a sentinel file outside it)
is byte-identical afterwards, or atomically replaced where the operation succeeded. ``.lock`` is
left out of the comparison: it holds the process id of its last holder, bookkeeping rather than
data. One small run is trained once per module and copied for each test.
"""

import errno
import gzip
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pyro_vae
from pyro_vae import VAE, ConfigError, DataError, NumericalError, TrainConfig, kl_weighted, log_marginal_likelihood
from pyro_vae.cli import main
from pyro_vae.data import IDX_STEMS, SYSTEM_DATA_DIRS, read_idx
from pyro_vae.inference_data import to_inference_data
from pyro_vae.run import RunFolder
from pyro_vae.train import Trainer

from .idx_files import write_dataset

TINY = ["--dataset", "mnist", "--hidden", "16", "--z-dim", "2", "--batch-size", "32", "--no-progress", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TRAINING_FILES = ["config.json", "metrics.jsonl", "checkpoint.pt", "elbo.png", "reconstructions.png", "samples.png", "manifold.png", "latent_scatter.png"]
EVALUATION_FILES = ["evaluation.json", "inference_data.nc"]


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``idx``: the run's data; ``other``: different images of the same shapes."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "idx", gz=True, n_train=128, n_test=32)
    write_dataset(root / "other", gz=True, seed=1, n_train=128, n_test=32)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A one-epoch run, evaluated (so it has every file a run folder can hold)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--data-dir", str(data / "idx"), "--run-dir", str(run)]) == 0
    assert main(["evaluate", str(run), "--num-samples", "4", "--idata-points", "4", "--no-progress", "--device", "cpu"]) == 0
    assert set(TRAINING_FILES + EVALUATION_FILES) <= {p.name for p in run.iterdir()}
    return run


class Folder:
    """A copy of the trained run, a sentinel file beside it, and the bytes they held at the start."""

    def __init__(self, root: Path, trained: Path):
        self.path = root / "run"
        shutil.copytree(trained, self.path)
        self.sentinel = root / "sentinel.txt"
        self.sentinel.write_bytes(b"not pyro-vae's to touch\n")
        self.remember()

    def remember(self):
        self.before = self.files()

    def files(self) -> dict[str, bytes]:
        found = {p.relative_to(self.path).as_posix(): p.read_bytes() for p in self.path.rglob("*") if p.is_file() and not p.is_symlink() and p.name != RunFolder.LOCK}
        return {**found, "../sentinel.txt": self.sentinel.read_bytes()}

    def assert_unchanged(self, config_rewritten: bool = False):
        """Every file as it was. ``config_rewritten``: a resume that got as far as starting rewrites
        config.json (atomically) with its new number of epochs; all else in it must be as it was."""
        after = self.files()
        assert sorted(after) == sorted(self.before), "files appeared or vanished"
        if config_rewritten:
            settings = lambda text: {k: v for k, v in json.loads(text).items() if k != "epochs"}
            assert settings(after.pop("config.json")) == settings(self.before["config.json"])
        assert [name for name in after if after[name] != self.before[name]] == [], "files changed"
        assert list(self.path.glob(".*.tmp")) == [], "temporary files left behind"

    def state(self) -> dict:
        return torch.load(self.path / "checkpoint.pt", weights_only=True)

    def save_state(self, state) -> None:
        torch.save(state, self.path / "checkpoint.pt")
        self.remember()


@pytest.fixture
def folder(tmp_path, trained):
    return Folder(tmp_path, trained)


def assert_one_line(err: str, *fragments: str) -> None:
    assert err.startswith("pyro-vae: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def refused(capsys, argv, *fragments) -> str:
    """Run the CLI in this process: exit status 2 and one line naming ``fragments``."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line(err, *fragments)
    return err


def succeeds(capsys, argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def strict_json_lines(path: Path) -> list:
    def no_constant(name):
        raise AssertionError(f"{path} holds a bare {name}: not JSON")

    return [json.loads(line, parse_constant=no_constant) for line in path.read_text().splitlines()]


def resume(folder, data, *more):
    return ["train", "--resume", "--run-dir", folder.path, "--data-dir", data / "idx", "--no-progress", *more]


# ------------------------------------------------------- 6: option values refused by the parser


TRAIN_OPTIONS = [
    (["--z-dim", "0"], "argument --z-dim: 0 is out of range"),
    (["--z-dim", "-3"], "argument --z-dim: -3 is out of range"),
    (["--batch-size", "0"], "argument --batch-size: 0 is out of range"),
    (["--hidden", "16", "-1"], "argument --hidden: -1 is out of range"),
    (["--hidden", "0"], "argument --hidden: 0 is out of range"),
    (["--epochs", "0"], "argument --epochs: 0 is out of range"),
    (["--num-particles", "0"], "argument --num-particles: 0 is out of range"),
    (["--seed", "-1"], "argument --seed: -1 is out of range"),
    (["--seed", str(2**64)], f"argument --seed: {2**64} is out of range"),
    (["--seed", "1e3"], "argument --seed: '1e3' is not a whole number"),
    (["--lr", "1e400"], "argument --lr: '1e400' is not a finite number"),
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["--lr", "0"], "argument --lr: 0 is out of range"),
    (["--lr", "11"], "argument --lr: 11 is out of range"),
    (["--likelihood", "normal", "--normal-scale", "0"], "a fixed normal scale must be a positive finite number, got 0"),
    (["--likelihood", "normal", "--normal-scale", "-1"], "a fixed normal scale must be a positive finite number, got -1"),
    (["--likelihood", "normal", "--normal-scale", "nan"], "a fixed normal scale must be a positive finite number, got nan"),
    (["--likelihood", "normal", "--normal-scale", "inf"], "a fixed normal scale must be a positive finite number, got inf"),
    (["--kl-anneal-epochs", "-1"], "argument --kl-anneal-epochs: -1 is out of range"),
    (["--max-train", "0"], "argument --max-train: 0 is out of range"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--test-fraction", "1"], "argument --test-fraction: 1 is out of range"),
    (["--image-size", "0", "8"], "argument --image-size: 0 is out of range"),
    (["--layout", "CHW"], "argument --layout: invalid choice: 'CHW'"),
    (["--likelihood", "poisson"], "invalid choice: 'poisson'"),
    (["--dist-timeout", "0"], "argument --dist-timeout: 0 is out of range"),
    (["--bogus-option"], "unrecognized arguments: --bogus-option"),
]


@pytest.mark.parametrize("args,message", TRAIN_OPTIONS, ids=[" ".join(a) for a, _ in TRAIN_OPTIONS])
def test_train_option_out_of_range_is_one_line_and_touches_nothing(folder, data, capsys, args, message):
    refused(capsys, ["train", *TINY, "--data-dir", data / "idx", "--run-dir", folder.path, *args], message, "--help)")
    folder.assert_unchanged()


@pytest.mark.parametrize("args,message", [
    (["--mixture-components", "3"], "--mixture-components is for --likelihood discretized_logistic_mixture; this run's likelihood is bernoulli: leave --mixture-components out"),
    (["--likelihood", "discretized_logistic", "--normal-scale", "pixel"], "--normal-scale is for --likelihood normal; this run's likelihood is discretized_logistic: leave --normal-scale out"),
])
def test_a_setting_for_another_likelihood_is_refused_not_ignored(tmp_path, data, capsys, args, message):
    run = tmp_path / "run"
    refused(capsys, ["train", *TINY, "--data-dir", data / "idx", "--run-dir", run, *args], message)
    assert not run.exists()


RUN_OPTIONS = [
    ("evaluate", ["--num-samples", "0"], "num_samples (--num-samples) must be at least 2, got 0: with one importance sample"),
    ("evaluate", ["--num-samples", "2.5"], "argument --num-samples: '2.5' is not a whole number"),
    ("evaluate", ["--chunk-size", "-5"], "argument --chunk-size: -5 is out of range"),
    ("evaluate", ["--idata-points", "-1"], "argument --idata-points: -1 is out of range"),
    ("evaluate", ["--idata-points", "0"], "argument --idata-points: 0 is out of range"),
    ("sample", ["--num", "0"], "argument --num: 0 is out of range"),
    ("sample", ["--num", "100000"], "it must be between 1 and 10000"),
    ("sample", ["--seed", "-1"], "argument --seed: -1 is out of range"),
    ("compare", ["--repeats", "1"], "argument --repeats: 1 is out of range"),
    ("compare", ["--particles", "4", "0"], "argument --particles: 0 is out of range"),
    ("compare", ["--num-data", "0"], "argument --num-data: 0 is out of range"),
    ("compare", ["--threads", "0"], "argument --threads: 0 is out of range"),
    ("compare", ["--estimators", "magic"], "invalid choice: 'magic'"),
]


@pytest.mark.parametrize("command,args,message", RUN_OPTIONS, ids=[f"{c} {' '.join(a)}" for c, a, _ in RUN_OPTIONS])
def test_zero_or_negative_counts_in_evaluate_sample_compare_are_refused(folder, capsys, command, args, message):
    refused(capsys, [command, folder.path, *args], message)
    folder.assert_unchanged()


# ------------------------------------------------------------- 6: options refused once parsed


def test_unknown_device_for_a_new_run_is_refused_and_no_folder_is_left(tmp_path, data, capsys):
    for device, message in (("tpu", "unknown device 'tpu'"), ("cuda:7", "'cuda:7'")):
        refused(capsys, ["train", *TINY, "--data-dir", data / "idx", "--run-dir", tmp_path / "new", "--device", device], message)
        assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command,device", [("evaluate", "tpu"), ("sample", "cuda:7"), ("evaluate", "cuda:7"), ("sample", "tpu")])
def test_unknown_device_for_a_saved_run_is_refused(folder, capsys, command, device):
    refused(capsys, [command, folder.path, "--device", device], repr(device))
    folder.assert_unchanged()


def test_num_particles_far_beyond_memory_is_refused_before_allocating(tmp_path, data, capsys):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(capsys, ["train", *TINY, "--data-dir", data / "idx", "--run-dir", tmp_path / "new", "--num-particles", 10**7, "--batch-size", 128], "--num-particles", "GiB")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024  # KiB: nothing big was allocated
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "command,args,message",
    [
        ("evaluate", ["--chunk-size", 10**7, "--num-samples", 10**7], "--chunk-size"),
        ("evaluate", ["--num-samples", 10**10, "--chunk-size", 10], "--num-samples"),
        ("compare", ["--particles", 10**8, "--repeats", 2], "--particles"),
    ],
    ids=["evaluate chunk", "evaluate kept weights", "compare particles"],
)
def test_evaluate_and_compare_beyond_memory_are_refused_naming_the_option(folder, capsys, command, args, message):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(capsys, [command, folder.path, "--no-progress", *args], message, "GiB")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024
    folder.assert_unchanged()


def test_library_refuses_a_step_beyond_memory(tmp_path, data):
    config = TrainConfig(dataset="mnist", data_dir=data / "idx", num_particles=10**7, batch_size=128, device="cpu")
    with pytest.raises(ConfigError, match="--num-particles"):
        Trainer(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--resume"], "--resume needs --run-dir"),
        (["train", "--resume", "--run-dir", "{tmp}/nowhere"], "holds no checkpoint.pt"),
        (["evaluate", "{tmp}/nowhere"], "holds no checkpoint.pt"),
        (["sample", "{tmp}/nowhere"], "holds no checkpoint.pt"),
        (["compare", "{tmp}/nowhere"], "holds no checkpoint.pt"),
        (["train", *TINY, "--run-dir", "{run}"], "already exists and is not empty; pass --resume"),
    ],
    ids=["resume without run-dir", "resume nowhere", "evaluate nowhere", "sample nowhere", "compare nowhere", "train over a run"],
)
def test_missing_or_occupied_run_folders_are_refused(folder, tmp_path, data, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, run=folder.path) for a in argv]
    refused(capsys, [*argv, "--data-dir", data / "idx"] if argv[0] == "train" else argv, message)
    folder.assert_unchanged()
    assert not (tmp_path / "nowhere").exists()


def test_a_run_stopped_before_its_first_checkpoint_is_explained(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}\n")
    refused(capsys, ["evaluate", tmp_path / "run"], "no checkpoint yet", "start it again without --resume")
    assert (tmp_path / "run" / "config.json").read_text() == "{}\n"


# --------------------------------------------------------- 1: the data a run is given is its own


@pytest.fixture
def system_data(data, monkeypatch):
    """Valid data in every place pyro-vae would look without --data-dir: a fallback would succeed."""
    monkeypatch.setitem(SYSTEM_DATA_DIRS, "mnist", (data / "idx",))
    monkeypatch.setenv("PYRO_VAE_DATA", str(data / "idx"))
    return data / "idx"


WRONG_DATA_DIRS = {
    "empty string": ("", "--data-dir is empty"),
    "misspelled": ("{tmp}/dta", "not found. Looked in: {tmp}/dta,"),
    "relative misspelled": ("dta", "not found. Looked in: {tmp}/dta,"),
    "a file": ("{tmp}/sentinel.txt", "is a file, not a folder"),
    "empty folder": ("{tmp}/empty", "not found. Looked in: {tmp}/empty,"),
}
DATA_COMMANDS = {
    "train": lambda f, d: ["train", *TINY, "--run-dir", f.path.parent / "new", "--data-dir", d],
    "resume": lambda f, d: ["train", "--resume", "--run-dir", f.path, "--no-progress", "--data-dir", d],
    "evaluate": lambda f, d: ["evaluate", f.path, "--no-progress", "--num-samples", 2, "--data-dir", d],
    "compare": lambda f, d: ["compare", f.path, "--no-progress", "--repeats", 2, "--particles", 1, "--data-dir", d],
}


@pytest.mark.parametrize("command", DATA_COMMANDS)
@pytest.mark.parametrize("wrong", WRONG_DATA_DIRS)
def test_a_wrong_data_dir_is_refused_never_replaced_by_the_systems_data(folder, tmp_path, system_data, monkeypatch, capsys, command, wrong):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    value, message = (s.format(tmp=tmp_path) for s in WRONG_DATA_DIRS[wrong])
    err = refused(capsys, DATA_COMMANDS[command](folder, value), message)
    assert str(system_data) not in err  # the fallback places are not even mentioned
    folder.assert_unchanged()
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", ["resume", "evaluate", "compare"])
def test_other_data_than_the_run_was_trained_on_is_refused_unless_allowed(folder, data, capsys, command):
    refused(capsys, DATA_COMMANDS[command](folder, data / "other"), "was trained on other data", "fingerprint", "--allow-different-data")
    folder.assert_unchanged()


def test_other_data_is_used_when_allowed_and_evaluated_into_files_of_its_own(folder, data, capsys):
    succeeds(capsys, [*DATA_COMMANDS["evaluate"](folder, data / "other"), "--allow-different-data", "--idata-points", 2])
    after = folder.files()
    assert {name for name in after if name not in folder.before} == {p.name for p in folder.path.glob("*-on-*")} and len(list(folder.path.glob("*-on-*"))) == 2
    assert all(after[name] == content for name, content in folder.before.items())  # the run's own evaluation.json included
    assert list(folder.path.glob(".*.tmp")) == []


@pytest.mark.parametrize("command", ["evaluate", "resume"])
@pytest.mark.parametrize("gone", ["moved away", "emptied"])
def test_a_run_whose_data_moved_is_refused_not_fed_the_systems_data(folder, tmp_path, system_data, capsys, command, gone):
    state = folder.state()
    state["config"]["data_dir"] = str(tmp_path / "moved")
    if gone == "emptied":
        (tmp_path / "moved").mkdir()
    (folder.path / "config.json").write_text(json.dumps(state["config"], indent=2) + "\n")  # as the run wrote both
    folder.save_state(state)
    argv = {"evaluate": ["evaluate", folder.path, "--num-samples", 2], "resume": ["train", "--resume", "--run-dir", folder.path, "--epochs", 2]}
    # the user never passed --data-dir: the message names the run's own place, and how to give the new one
    err = refused(capsys, argv[command], f"the run's data were in {tmp_path / 'moved'}, which no longer holds them; pass --data-dir with their new location")
    assert str(system_data) not in err and "spelling" not in err
    folder.assert_unchanged()


def test_a_relative_data_dir_is_used_and_recorded_resolved(tmp_path, data, monkeypatch, capsys):
    monkeypatch.chdir(data)
    succeeds(capsys, ["train", *TINY, "--epochs", "1", "--max-train", "32", "--data-dir", "idx", "--run-dir", tmp_path / "run"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(data / "idx")
    assert str(data / "idx") in torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["data"]["source"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_split_is_refused(tmp_path, capsys, split):
    write_dataset(tmp_path / "data", gz=False, **{f"n_{split}": 0})
    refused(capsys, ["train", *TINY, "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "new"], f"the {split} split has no images")
    assert not (tmp_path / "new").exists()


def test_a_truncated_idx_file_is_refused_naming_it(tmp_path, capsys):
    write_dataset(tmp_path / "data", gz=False)
    victim = tmp_path / "data" / IDX_STEMS["test_images"]
    victim.write_bytes(victim.read_bytes()[:999])
    refused(capsys, ["train", *TINY, "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "new"], str(victim), "delete it and re-download it")


def gzip_claiming(path: Path, count: int, payload: int) -> Path:
    """A gzipped IDX image file whose header claims ``count`` 28x28 images, followed by ``payload`` zero bytes."""
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (count, 28, 28))
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header)
        for _ in range(payload // 2**20):
            f.write(bytes(2**20))
    return path


def test_an_idx_header_claiming_gibibytes_is_refused_from_the_header(tmp_path, capsys):
    write_dataset(tmp_path / "data", gz=True)
    bomb = gzip_claiming(tmp_path / "data" / f"{IDX_STEMS['train_images']}.gz", 2**32 - 1, 0)
    with pytest.raises(DataError, match="header announces"):
        read_idx(bomb)
    refused(capsys, ["train", *TINY, "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "new"], "header announces", "more than the")


@pytest.mark.slow
def test_a_small_gzip_claiming_gibibytes_never_costs_that_memory(tmp_path):
    # 16 MiB of zeros (a few KB gzipped) behind headers claiming 78 GB (over the cap) and 1.4 GB (under it, short)
    over = gzip_claiming(tmp_path / "over.gz", 10**8, 16 * 2**20)
    short = gzip_claiming(tmp_path / "short.gz", 1_900_000, 16 * 2**20)
    code = (
        "import resource, sys\n"
        "from pyro_vae.data import read_idx\n"
        "from pyro_vae.errors import DataError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        read_idx(path)\n"
        "    except DataError as e:\n"
        "        print('refused:', e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(over), str(short)], capture_output=True, text=True, env=ENV, timeout=300)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 3, done.stderr
    assert "header announces" in lines[0] and "payload has" in lines[1]
    assert int(lines[2]) < 200 * 1024  # KiB of peak memory beyond the imports: the 16 MiB read, not gibibytes


# ------------------------------------------------- 6: damaged checkpoints that weights_only accepts


def _first(weights, name):
    return next(k for k in weights if name in k)


def _set(state, key, value):
    state[key] = value
    return state


def _model(state, change):
    state["model"] = change(dict(state["model"]))
    return state


def _config(state, **changes):
    state["config"] = {**state["config"], **changes}
    return state


def _adam_wrong_shape(state):
    first = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3)
    return state


DAMAGES = {
    "not a mapping": (lambda s: [1, 2, 3], "not a pyro-vae checkpoint (it holds a list"),
    "no model": (lambda s: {k: v for k, v in s.items() if k != "model"}, "'model' missing"),
    "no optimizer": (lambda s: {k: v for k, v in s.items() if k != "optimizer"}, "'optimizer' missing"),
    "no rng": (lambda s: {k: v for k, v in s.items() if k != "rng"}, "'rng' missing"),
    "no data record": (lambda s: {k: v for k, v in s.items() if k != "data"}, "'data' missing"),
    "metrics not a list": (lambda s: _set(s, "metrics", {"epoch": 1}), "'metrics' missing or not a list"),
    "metrics rows damaged": (lambda s: _set(s, "metrics", [1, 2]), "damaged metrics"),
    "rng of the wrong type": (lambda s: _set(s, "rng", {"torch": [1, 2]}), "no saved random-number state"),
    "rng of the wrong shape": (lambda s: _set(s, "rng", {"torch": torch.zeros(3)}), "no saved random-number state"),
    "weights of the wrong shape": (lambda s: _model(s, lambda m: {**m, _first(m, "weight"): torch.zeros(3, 3)}), "size mismatch"),
    "a weight missing": (lambda s: _model(s, lambda m: {k: v for k, v in m.items() if k != _first(m, "weight")}), "Missing key"),
    "an unknown weight": (lambda s: _model(s, lambda m: {**m, "extra.weight": torch.zeros(1)}), "Unexpected key"),
    "a weight that is not a tensor": (lambda s: _model(s, lambda m: {**m, _first(m, "weight"): 1.5}), "expected torch.Tensor"),
    "NaN weights": (lambda s: _model(s, lambda m: {**m, _first(m, "weight"): m[_first(m, "weight")] * math.nan}), "non-finite model weights"),
    "infinite weights": (lambda s: _model(s, lambda m: {**m, _first(m, "bias"): m[_first(m, "bias")] + math.inf}), "non-finite model weights"),
    "finite weights that overflow": (lambda s: _model(s, lambda m: {k: (v * 0 + 1e38 if "encoder" in k else v) for k, v in m.items()}), "outputs are not finite"),
    "optimizer of another model": (lambda s: _set(s, "optimizer", {"state": {}, "param_groups": []}), "optimizer state that does not fit"),
    "optimizer not an optimizer": (lambda s: _set(s, "optimizer", {"x": 1}), "optimizer state that does not fit"),
    "optimizer moments of the wrong shape": (_adam_wrong_shape, "exp_avg has shape (3,)"),
    "config not a mapping": (lambda s: _set(s, "config", [1]), "'config' missing or not a dict"),
    "config from a newer version": (lambda s: _config(s, future_setting=1), "does not know (future_setting); it was written by a newer version"),
    "config z_dim not a number": (lambda s: _config(s, z_dim="two"), "z_dim must be an integer >= 1, got 'two'"),
    "config negative hidden width": (lambda s: _config(s, hidden=[-1]), "a hidden layer width must be an integer >= 1, got -1"),
    "config negative seed": (lambda s: _config(s, seed=-5), "seed must be an integer from 0 to 9223372036854775807, got -5"),
    "config batch size a string": (lambda s: _config(s, batch_size="32"), "batch_size must be an integer"),
    "config unknown likelihood": (lambda s: _config(s, likelihood="poisson"), "unknown likelihood 'poisson'"),
    "config unknown binarization": (lambda s: _config(s, binarize="sometimes"), "unknown binarization 'sometimes'"),
    "config data_dir not a path": (lambda s: _config(s, data_dir=5), "not a valid configuration"),
}
RAW_DAMAGES = {
    "truncated": (lambda b: b[: len(b) // 2], "not a readable checkpoint"),
    "empty": (lambda b: b"", "not a readable checkpoint"),
    "random bytes": (lambda b: os.urandom(4096), "checkpoint"),
}


def damage(folder, name):
    if name in RAW_DAMAGES:
        path = folder.path / "checkpoint.pt"
        path.write_bytes(RAW_DAMAGES[name][0](path.read_bytes()))
        folder.remember()
        return RAW_DAMAGES[name][1]
    change, message = DAMAGES[name]
    folder.save_state(change(folder.state()))
    return message


DAMAGED_COMMANDS = {
    "evaluate": lambda f, d: ["evaluate", f.path, "--num-samples", 2, "--no-progress"],
    "resume": lambda f, d: resume(f, d, "--epochs", 2),
    "sample": lambda f, d: ["sample", f.path, "--num", 4],
    "compare": lambda f, d: ["compare", f.path, "--repeats", 2, "--particles", 1, "--no-progress"],
}


@pytest.mark.parametrize("command", ["evaluate", "resume"])
@pytest.mark.parametrize("name", [*DAMAGES, *RAW_DAMAGES])
def test_a_damaged_checkpoint_is_one_line_and_nothing_is_overwritten(folder, data, capsys, name, command):
    message = damage(folder, name)
    refused(capsys, DAMAGED_COMMANDS[command](folder, data), message, str(folder.path))
    folder.assert_unchanged()


@pytest.mark.parametrize("command", ["sample", "compare"])
@pytest.mark.parametrize("name", ["weights of the wrong shape", "config negative seed", "finite weights that overflow", "truncated"])
def test_a_damaged_checkpoint_cannot_be_sampled_or_compared(folder, data, capsys, name, command):
    message = damage(folder, name)
    refused(capsys, DAMAGED_COMMANDS[command](folder, data), message)
    folder.assert_unchanged()


def test_a_checkpoint_that_is_a_folder_is_refused(folder, capsys):
    (folder.path / "checkpoint.pt").unlink()
    (folder.path / "checkpoint.pt").mkdir()
    folder.remember()
    refused(capsys, ["evaluate", folder.path], "checkpoint.pt is not a file, though metrics.jsonl records 1 epoch")
    folder.assert_unchanged()


# ---------------------------------------------------------- 2: writes never follow a symlink out


def link_out(folder, names):
    """Replace each file by a symlink to an identical copy outside the run folder."""
    outside = folder.path.parent / "outside"
    outside.mkdir(exist_ok=True)
    for name in names:
        shutil.move(folder.path / name, outside / name)
        (folder.path / name).symlink_to(outside / name)
    return {name: (outside / name).read_bytes() for name in names}, outside


def test_training_replaces_symlinks_and_never_writes_through_them(folder, data, capsys):
    kept, outside = link_out(folder, TRAINING_FILES)
    succeeds(capsys, resume(folder, data, "--epochs", 2))
    for name in TRAINING_FILES:
        assert (outside / name).read_bytes() == kept[name], f"{name}: written through the link"
        assert not (folder.path / name).is_symlink() and (folder.path / name).is_file()
    assert [row["epoch"] for row in strict_json_lines(folder.path / "metrics.jsonl")] == [1, 2]
    assert folder.sentinel.read_bytes() == folder.before["../sentinel.txt"]


def test_evaluate_replaces_symlinks_and_never_writes_through_them(folder, capsys):
    kept, outside = link_out(folder, EVALUATION_FILES)
    succeeds(capsys, ["evaluate", folder.path, "--num-samples", 3, "--idata-points", 2, "--no-progress"])
    for name in EVALUATION_FILES:
        assert (outside / name).read_bytes() == kept[name]
        assert not (folder.path / name).is_symlink()
    assert json.loads((folder.path / "evaluation.json").read_text())["num_samples"] == 3


def test_sample_and_compare_replace_symlinks_at_their_outputs(folder, capsys):
    (folder.path / "compare").mkdir()
    targets = {"mine.png": folder.path / "mine.png", "run.csv": folder.path / "compare" / "run.csv", "run.png": folder.path / "compare" / "run.png"}
    for target in targets.values():
        target.symlink_to(folder.sentinel)
    succeeds(capsys, ["sample", folder.path, "--num", 4, "--out", targets["mine.png"]])
    succeeds(capsys, ["compare", folder.path, "--estimators", "trace", "--particles", 1, "--repeats", 2, "--num-data", 4, "--no-progress"])
    assert folder.sentinel.read_bytes() == folder.before["../sentinel.txt"]
    assert not any(t.is_symlink() for t in targets.values()) and (folder.path / "compare" / "run.csv").read_text().startswith("estimator")


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(folder, data, capsys):
    (folder.path / ".lock").unlink()
    (folder.path / ".lock").symlink_to(folder.sentinel)
    refused(capsys, resume(folder, data, "--epochs", 2), "cannot train in", ".lock is a symbolic link", "remove it")
    refused(capsys, ["evaluate", folder.path], "cannot evaluate in", ".lock is a symbolic link")
    folder.assert_unchanged()


# ---------------------------------------------------------------- 3: one writer at a time


@pytest.mark.parametrize(
    "argv",
    [
        lambda f, d: resume(f, d, "--epochs", 2),
        lambda f, d: ["evaluate", f.path, "--num-samples", 2],
        lambda f, d: ["train", *TINY, "--data-dir", d / "idx", "--run-dir", f.path],
    ],
    ids=["resume", "evaluate", "new run in the same folder"],
)
def test_a_second_writer_is_refused_naming_the_holder_and_leaves_its_temp_files(folder, data, capsys, argv):
    planted = folder.path / ".checkpoint.pt.in-progress.tmp"  # what the holder is writing right now
    with RunFolder(folder.path).locked():
        planted.write_bytes(b"half a checkpoint")
        refused(capsys, argv(folder, data), f"is in use by process {os.getpid()}", "wait for it to finish")
        assert planted.read_bytes() == b"half a checkpoint"
    planted.unlink()
    folder.assert_unchanged()


def test_temp_files_of_a_dead_writer_are_cleaned_by_the_next_lock_holder(folder, data, capsys):
    leftover = folder.path / ".checkpoint.pt.killed.tmp"
    leftover.write_bytes(b"half a checkpoint")
    succeeds(capsys, resume(folder, data, "--epochs", 1))  # nothing to train: takes the lock and cleans up
    assert not leftover.exists()
    folder.assert_unchanged()


HOLD_THE_LOCK = """
import sys, time
from pyro_vae.run import RunFolder
with RunFolder(sys.argv[1]).locked():
    print("holding", flush=True)
    time.sleep(300)
"""


@pytest.mark.slow
def test_two_real_processes_the_second_is_refused_with_the_holders_pid(folder, data):
    planted = folder.path / ".metrics.jsonl.in-progress.tmp"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(folder.path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "holding"
        planted.write_bytes(b"being written")
        second = subprocess.run([sys.executable, "-m", "pyro_vae.cli", *map(str, resume(folder, data, "--epochs", 2))], capture_output=True, text=True, env=ENV, timeout=300)
        assert second.returncode == 2, second.stderr
        assert_one_line(second.stderr, f"is in use by process {holder.pid}")
        assert planted.read_bytes() == b"being written"  # not the refused process's to remove
    finally:
        holder.kill()
        holder.wait()
    planted.unlink()
    folder.assert_unchanged()


# ------------------------------------------------------------ 4: evaluate writes all or nothing


def fail_to_write(name):
    """A stand-in for RunFolder.write_text that finds the disk full when it writes ``name``."""
    original = RunFolder.write_text

    def write_text(self, target, text):
        if target == name:
            raise ConfigError(f"cannot write {self.path / name}: No space left on device; the previous file is intact. Free disk space or choose a writable folder")
        return original(self, target, text)

    return write_text


def test_evaluate_failing_at_its_second_file_restores_the_first(folder, monkeypatch, capsys):
    monkeypatch.setattr(RunFolder, "write_text", fail_to_write("evaluation.json"))
    refused(capsys, ["evaluate", folder.path, "--num-samples", 3, "--idata-points", 2, "--no-progress"], "No space left on device")
    folder.assert_unchanged()  # inference_data.nc had been replaced: it is put back


def test_evaluate_failing_in_the_middle_of_a_file_leaves_the_old_one(folder, monkeypatch, capsys):
    write_bytes = Path.write_bytes

    def half_written(self, data):
        if "inference_data" not in self.name:
            return write_bytes(self, data)
        write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", half_written)
    refused(capsys, ["evaluate", folder.path, "--num-samples", 3, "--idata-points", 2, "--no-progress"], "cannot write", "inference_data.nc", "No space left on device")
    folder.assert_unchanged()


def test_an_evaluation_of_an_earlier_checkpoint_is_marked_stale(folder, data, capsys):
    for epochs in (2, 3):  # the note names the epoch the run has reached, at every checkpoint
        succeeds(capsys, resume(folder, data, "--epochs", epochs))
        record = json.loads((folder.path / "evaluation.json").read_text(), parse_constant=lambda name: pytest.fail(f"bare {name}"))
        assert record["epochs"] == 1 and f"trained to epoch {epochs} since: run pyro-vae evaluate again" in record["stale"]
        assert {k: v for k, v in record.items() if k != "stale"} == json.loads(folder.before["evaluation.json"])


@pytest.mark.slow
def test_evaluate_killed_mid_way_leaves_the_previous_evaluation(folder):
    victim = subprocess.Popen([sys.executable, "-m", "pyro_vae.cli", "evaluate", str(folder.path), "--num-samples", "1000000", "--chunk-size", "100", "--no-progress"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while (folder.path / ".lock").read_text().strip() != str(victim.pid):  # it holds the lock: evaluating
        assert victim.poll() is None and time.monotonic() < deadline, "the evaluation never started"
        time.sleep(0.05)
    time.sleep(1.0)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    with RunFolder(folder.path).locked():  # the dead writer's lock is gone with it; its temp files go with the next holder
        pass
    folder.assert_unchanged()


# ------------------------------------------------------------ 6: disk full and read-only folders


def test_a_torchvision_built_for_another_torch_is_one_line_before_training(tmp_path, data):
    # such a torchvision imports its Python code and then fails loading its operators; a package
    # first on the path fails the same way, so the real loader meets the real error
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    run = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "1", "--data-dir", data / "idx", "--run-dir", run]
    done = subprocess.run([sys.executable, "-m", "pyro_vae.cli", *map(str, argv)], capture_output=True, text=True, timeout=300,
                          env={**ENV, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(Path(pyro_vae.__file__).parents[1])])})
    assert done.returncode == 2, done.stderr
    assert_one_line(done.stderr, f"torchvision cannot be loaded with torch {torch.__version__} (operator torchvision::nms does not exist)",
                    "pip install --force-reinstall torch torchvision")
    assert not run.exists()  # refused before the first epoch, not after it


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted at tmp_path/mnt (root only), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> None:
    """Fill the file system until about ``leave`` bytes are free."""
    stat = os.statvfs(mnt)
    free = stat.f_bavail * stat.f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(bytes(max(free - leave, 0)))
        f.flush()


@pytest.mark.parametrize(
    "argv,message",
    [
        (lambda f, d: ["evaluate", f.path, "--num-samples", 3, "--idata-points", 2, "--no-progress"], "No space left on device"),
        (lambda f, d: resume(f, d, "--epochs", 2), "No space left on device"),
    ],
    ids=["evaluate", "resume"],
)
def test_a_full_disk_is_one_line_and_the_previous_files_stay(tmpfs, trained, data, capsys, argv, message):
    folder = Folder(tmpfs, trained)
    fill(tmpfs, leave=16 * 1024)
    refused(capsys, argv(folder, data), message, "the previous file is intact")
    folder.assert_unchanged(config_rewritten=True)


def test_a_completely_full_disk_still_gives_one_line(tmpfs, trained, capsys):
    folder = Folder(tmpfs, trained)
    (folder.path / ".lock").write_bytes(b"")  # no room even to name the lock's holder
    fill(tmpfs, leave=0)
    refused(capsys, ["evaluate", folder.path, "--num-samples", 3, "--idata-points", 2, "--no-progress"], "No space left on device")
    folder.assert_unchanged()


@pytest.mark.parametrize(
    "argv,message",
    [
        (lambda f, d: ["evaluate", f.path, "--num-samples", 3, "--no-progress"], "pass --out with a place you can write to"),
        (lambda f, d: resume(f, d, "--epochs", 2), "cannot train in"),
        (lambda f, d: ["sample", f.path, "--num", 4], "pass --out with a place you can write to"),
        (lambda f, d: ["compare", f.path, "--estimators", "trace", "--particles", 1, "--repeats", 2, "--num-data", 4], "pass --out with a place you can write to"),
    ],
    ids=["evaluate", "resume", "sample", "compare"],
)
def test_a_read_only_run_folder_is_one_line(tmpfs, trained, data, capsys, argv, message):
    # root ignores chmod 555, so the folder is made read-only the way root cannot ignore: a read-only mount
    folder = Folder(tmpfs, trained)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    capsys.readouterr()
    refused(capsys, argv(folder, data), message, "Read-only file system")
    folder.assert_unchanged()


def test_a_read_only_run_is_evaluated_into_out(tmpfs, trained, tmp_path, capsys):
    folder = Folder(tmpfs, trained)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    out = succeeds(capsys, ["evaluate", folder.path, "--num-samples", 3, "--idata-points", 2, "--no-progress", "--out", tmp_path / "results"])
    assert f"written: {tmp_path / 'results' / 'evaluation.json'}" in out
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == EVALUATION_FILES  # the run folder's names, nothing else
    record = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert record["epochs"] == 1 and record["num_samples"] == 3 and record["data"] == folder.state()["data"]
    folder.assert_unchanged()


# ------------------------------------------------------ 5: no good step, strict metrics JSON


def test_a_run_with_no_finite_step_fails_naming_the_cause(tmp_path, data, capsys):
    run = tmp_path / "run"
    refused(capsys, ["train", *TINY, "--data-dir", data / "idx", "--run-dir", run, "--likelihood", "normal", "--normal-scale", "1e-30"],
            "no training step of epoch 1 gave a finite loss", "--lr (now 0.001)", "--normal-scale", "no checkpoint was written")
    assert not (run / "checkpoint.pt").exists() and not (run / "metrics.jsonl").exists()


def test_a_resumed_run_that_diverges_names_the_last_good_checkpoint_and_keeps_it(folder, data, monkeypatch, capsys):
    from pyro_vae.train import Trainer

    monkeypatch.setattr(Trainer, "train_step", lambda self, x, kl_weight=1.0: None)  # every step non-finite
    refused(capsys, resume(folder, data, "--epochs", 3), "no training step of epoch 2", f"the last good checkpoint is {folder.path / 'checkpoint.pt'}", "--lr")
    folder.assert_unchanged(config_rewritten=True)
    strict_json_lines(folder.path / "metrics.jsonl")


def test_lr_10_on_a_tiny_run_ends_in_a_result_or_one_line(tmp_path, data, capsys):
    capsys.readouterr()
    code = main([str(a) for a in ["train", *TINY, "--epochs", "2", "--lr", "10", "--data-dir", data / "idx", "--run-dir", tmp_path / "run"]])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert_one_line(err, "--lr (now 10)")
    if (tmp_path / "run" / "metrics.jsonl").exists():
        assert all(math.isfinite(row["test_elbo"]) for row in strict_json_lines(tmp_path / "run" / "metrics.jsonl"))


def test_metrics_are_strict_json_even_with_non_finite_numbers(tmp_path):
    RunFolder(tmp_path).write_metrics([{"epoch": 1, "train_elbo": math.nan, "test_elbo": -math.inf, "skipped_steps": 3}])
    (row,) = strict_json_lines(tmp_path / "metrics.jsonl")
    assert row == {"epoch": 1, "train_elbo": None, "test_elbo": None, "skipped_steps": 3}


# ------------------------------------------------------------------ 8: the library's edge values


def small_vae(**kw):
    return VAE(**{"x_dim": 6, "z_dim": 2, "hidden": (4,), **kw})


LIBRARY = {
    "x_dim 2.5": (lambda: small_vae(x_dim=2.5), ConfigError, "x_dim must be an integer >= 1"),
    "x_dim True": (lambda: small_vae(x_dim=True), ConfigError, "x_dim must be an integer >= 1"),
    "x_dim -3": (lambda: small_vae(x_dim=-3), ConfigError, "x_dim must be an integer >= 1, got -3"),
    "x_dim '6'": (lambda: small_vae(x_dim="6"), ConfigError, "x_dim must be an integer >= 1"),
    "z_dim 0": (lambda: small_vae(z_dim=0), ConfigError, "z_dim must be an integer >= 1, got 0"),
    "z_dim 2.0": (lambda: small_vae(z_dim=2.0), ConfigError, "z_dim must be an integer >= 1"),
    "hidden (-1,)": (lambda: small_vae(hidden=(-1,)), ConfigError, "hidden layer width must be an integer >= 1, got -1"),
    "hidden (0,)": (lambda: small_vae(hidden=(0,)), ConfigError, "hidden layer width"),
    "hidden -4": (lambda: small_vae(hidden=-4), ConfigError, "hidden layer width"),
    "hidden (2.5,)": (lambda: small_vae(hidden=(2.5,)), ConfigError, "hidden layer width"),
    "hidden None": (lambda: small_vae(hidden=None), ConfigError, "hidden must be a width or a sequence"),
    "hidden '16'": (lambda: small_vae(hidden="16"), ConfigError, "hidden must be a width or a sequence"),
    "conv hidden (0,)": (lambda: VAE(x_dim=784, z_dim=2, architecture="conv", hidden=(0,)), ConfigError, "hidden layer width"),
    "normal scale inf": (lambda: small_vae(likelihood="normal", normal_scale=math.inf), ConfigError, "positive finite number"),
    "normal scale True": (lambda: small_vae(likelihood="normal", normal_scale=True), ConfigError, "positive finite number"),
    "normal scale nan": (lambda: small_vae(likelihood="normal", normal_scale=math.nan), ConfigError, "positive"),
    "generate(0)": (lambda: small_vae().generate(0), ConfigError, "number of samples n must be an integer >= 1, got 0"),
    "generate(-1)": (lambda: small_vae().generate(-1), ConfigError, "got -1"),
    "generate(2.5)": (lambda: small_vae().generate(2.5), ConfigError, "got 2.5"),
    "generate(True)": (lambda: small_vae().generate(True), ConfigError, "got True"),
    "reconstruct (3, 5)": (lambda: small_vae().reconstruct(torch.zeros(3, 5)), DataError, "x has shape (3, 5), but this model takes a batch of shape (N, 6)"),
    "reconstruct (6,)": (lambda: small_vae().reconstruct(torch.zeros(6)), DataError, "x has shape (6,)"),
    "reconstruct empty": (lambda: small_vae().reconstruct(torch.zeros(0, 6)), DataError, "empty batch"),
    "reconstruct int64": (lambda: small_vae().reconstruct(torch.zeros(2, 6, dtype=torch.long)), DataError, "convert it to floating point"),
    "reconstruct a list": (lambda: small_vae().reconstruct([[0.0] * 6]), DataError, "must be a torch.Tensor"),
    "reconstruct NaN": (lambda: small_vae().reconstruct(torch.full((2, 6), math.nan)), DataError, "NaN or infinite"),
    "kl weight NaN": (lambda: pyro_vae.kl_weighted(small_vae().model, math.nan), ConfigError, "finite number >= 0, got nan"),
    "kl weight -1": (lambda: kl_weighted(small_vae().model, -1.0), ConfigError, "finite number >= 0"),
    "num_samples 2.5": (lambda: log_marginal_likelihood(*_pair(), num_samples=2.5), ConfigError, "num_samples must be an integer >= 1, got 2.5"),
    "num_samples True": (lambda: log_marginal_likelihood(*_pair(), num_samples=True), ConfigError, "num_samples must be an integer"),
    "num_samples 0": (lambda: log_marginal_likelihood(*_pair(), num_samples=0), ConfigError, "num_samples must be an integer"),
    "chunk_size 0": (lambda: log_marginal_likelihood(*_pair(), num_samples=4, chunk_size=0), ConfigError, "chunk_size must be an integer"),
    "TrainConfig z_dim 0": (lambda: TrainConfig(dataset="mnist", z_dim=0).validate(), ConfigError, "z_dim must be an integer >= 1"),
    "TrainConfig lr nan": (lambda: TrainConfig(dataset="mnist", lr=math.nan).validate(), ConfigError, "learning rate"),
    "TrainConfig data_dir ''": (lambda: TrainConfig(dataset="mnist", data_dir=" "), DataError, "--data-dir is empty"),
    "export of no datapoints": (lambda: to_inference_data(small_vae(), torch.zeros(0, 6)), DataError, "empty batch"),
    "from_dict not a mapping": (lambda: TrainConfig.from_dict([1]), ConfigError, "not a mapping of settings"),
}


def _pair():
    vae = small_vae()
    return vae.model, vae.guide, torch.bernoulli(torch.rand(3, 6))


@pytest.mark.parametrize("name", LIBRARY)
def test_the_library_refuses_edge_values_with_its_own_errors(name):
    call, kind, message = LIBRARY[name]
    with pytest.raises(kind) as info:
        call()
    assert type(info.value) is kind and message in str(info.value) and "\n" not in str(info.value)


def test_one_importance_sample_is_an_unreliable_estimate_not_an_index_error():
    result = log_marginal_likelihood(*_pair(), num_samples=1, warn=False)
    assert result.num_samples == 1 and result.unreliable_share() == 1.0


def test_the_library_raises_numerical_error_when_no_step_is_finite(tmp_path, data, monkeypatch):
    from pyro_vae.train import Trainer, train

    monkeypatch.setattr(Trainer, "train_step", lambda self, x, kl_weight=1.0: None)
    config = TrainConfig(dataset="mnist", hidden=(16,), z_dim=2, batch_size=32, epochs=1, device="cpu", data_dir=str(data / "idx"))
    with pytest.raises(NumericalError, match=r"no training step of epoch 1 .* no checkpoint was written\. Try a lower --lr") as info:
        train(config, tmp_path / "run", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "run" / "checkpoint.pt").exists()


# ----------------- 7: what is read is what the lock protects; a lost checkpoint; --out; a run just begun


@pytest.mark.parametrize("command", [["evaluate", "{run}", "--num-samples", "2"], ["sample", "{run}", "--num", "4"]], ids=["evaluate", "sample"])
def test_evaluate_and_sample_into_the_run_folder_lock_it_before_reading_it(folder, capsys, command):
    # under another writer's lock the checkpoint is that writer's business: a command that read it before
    # locking would be refused for this damaged file; one that locks first is refused for the lock, naming it
    with RunFolder(folder.path).locked():
        (folder.path / "checkpoint.pt").write_bytes(b"not a checkpoint")
        refused(capsys, [a.format(run=folder.path) for a in command], f"is in use by process {os.getpid()}")


def test_a_run_loaded_before_a_training_went_on_is_not_evaluated_as_if_current(folder, data, capsys):
    from pyro_vae.run import load_run, opened_run

    run = load_run(folder.path, "cpu")  # epoch 1; then a training writes epoch 2 before the evaluation locks
    succeeds(capsys, resume(folder, data, "--epochs", 2))
    before = {name: (folder.path / name).read_bytes() for name in EVALUATION_FILES}
    with pytest.raises(ConfigError, match=r"checkpoint\.pt was replaced \(a training went on\) after this run was loaded"):
        run.evaluate(num_samples=2, idata_points=2)
    assert {name: (folder.path / name).read_bytes() for name in EVALUATION_FILES} == before
    assert "trained to epoch 2 since" in json.loads(before["evaluation.json"])["stale"]  # still says what it describes
    with opened_run(folder.path, "cpu", doing="evaluate") as current:  # locked, then loaded: epoch 2
        current.evaluate(num_samples=2, idata_points=2)
    record = json.loads((folder.path / "evaluation.json").read_text())
    assert record["epochs"] == 2 and "stale" not in record


@pytest.fixture(scope="module")
def validated(tmp_path_factory, data):
    """A one-epoch run with a validation split: it has best.pt."""
    run = tmp_path_factory.mktemp("validated") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--validation-size", "16", "--data-dir", str(data / "idx"), "--run-dir", str(run)]) == 0
    assert (run / "best.pt").is_file()
    return run


LOST = "checkpoint.pt is missing, though metrics.jsonl records 1 epoch: put checkpoint.pt back to resume or evaluate the run, or start a new --run-dir"


@pytest.mark.parametrize("command", ["resume", "evaluate", "sample"])
@pytest.mark.parametrize("with_best", [True, False], ids=["best.pt", "no best.pt"])
def test_a_lost_checkpoint_is_named_with_the_real_ways_out(tmp_path, trained, validated, data, capsys, with_best, command):
    folder = Folder(tmp_path, validated if with_best else trained)
    (folder.path / "checkpoint.pt").unlink()
    folder.remember()
    argv = {"resume": resume(folder, data, "--epochs", 2), "evaluate": ["evaluate", folder.path, "--num-samples", 2], "sample": ["sample", folder.path, "--num", 4]}
    err = refused(capsys, argv[command], LOST)
    assert ("best.pt still holds the best epoch's model: evaluate or sample it with --model best" in err) == with_best
    assert "first epoch" not in err and "without --resume" not in err  # not the loop the trial found
    folder.assert_unchanged()


def test_the_best_model_is_evaluated_and_sampled_without_the_checkpoint(tmp_path, validated, capsys):
    folder = Folder(tmp_path, validated)
    (folder.path / "checkpoint.pt").unlink()
    succeeds(capsys, ["evaluate", folder.path, "--model", "best", "--num-samples", 3, "--idata-points", 2, "--no-progress"])
    record = json.loads((folder.path / "evaluation.json").read_text())
    (epoch_1,) = strict_json_lines(folder.path / "metrics.jsonl")
    assert (record["model"], record["model_epoch"], record["epochs"]) == ("best", 1, 1)
    assert record["test_elbo"] == epoch_1["test_elbo"]  # the weights training scored, on the data it recorded in best.pt
    succeeds(capsys, ["sample", folder.path, "--model", "best", "--num", 4, "--out", tmp_path / "best.png"])
    assert (tmp_path / "best.png").read_bytes().startswith(b"\x89PNG")
    assert not (folder.path / "checkpoint.pt").exists()


def test_an_older_best_pt_without_the_datas_fingerprint_needs_allow_different_data(tmp_path, validated, capsys):
    folder = Folder(tmp_path, validated)
    (folder.path / "checkpoint.pt").unlink()
    best = torch.load(folder.path / "best.pt", weights_only=True)
    torch.save({"epoch": best["epoch"], "model": best["model"]}, folder.path / "best.pt")  # as runs wrote it before
    folder.remember()
    argv = ["evaluate", folder.path, "--model", "best", "--num-samples", 3, "--idata-points", 2, "--no-progress"]
    refused(capsys, argv, "data was kept in its missing checkpoint.pt", "pass --allow-different-data to use them")
    folder.assert_unchanged()
    succeeds(capsys, [*argv, "--allow-different-data"])
    assert len(list(folder.path.glob("evaluation-on-*.json"))) == 1 and not (folder.path / "evaluation.json").exists()


def test_evaluate_out_writes_elsewhere_and_only_reads_the_run_folder(folder, tmp_path, capsys):
    with RunFolder(folder.path).locked():  # a training holds the folder: it is read all the same, never written
        out = succeeds(capsys, ["evaluate", folder.path, "--num-samples", 3, "--idata-points", 2, "--no-progress", "--out", tmp_path / "results"])
    assert f"written: {tmp_path / 'results' / 'evaluation.json'}" in out
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == EVALUATION_FILES
    record = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert record["epochs"] == 1 and record["num_samples"] == 3
    folder.assert_unchanged()


OUT_COMMANDS = {
    "evaluate": lambda f: ["evaluate", f.path, "--num-samples", 3, "--no-progress"],
    "compare": lambda f: ["compare", f.path, "--estimators", "trace", "--particles", 1, "--repeats", 2, "--num-data", 4, "--no-progress"],
}


@pytest.mark.parametrize("command", OUT_COMMANDS)
@pytest.mark.parametrize(
    "out,message",
    [("{sentinel}", "--out {sentinel} is a file, not a folder"), ("{sentinel}/results", "Not a directory; pass --out with a place you can write to"), ("{run}", "is the run folder")],
    ids=["a file", "under a file", "the run folder"],
)
def test_an_out_that_cannot_take_the_results_is_refused_before_computing(folder, capsys, command, out, message):
    out = out.format(sentinel=folder.sentinel, run=folder.path)
    capsys.readouterr()
    code = main([str(a) for a in [*OUT_COMMANDS[command](folder), "--out", out]])
    printed, err = capsys.readouterr()
    assert code == 2 and printed == "", printed  # compare prints its title before it computes: it never began
    assert_one_line(err, message.format(sentinel=folder.sentinel))
    folder.assert_unchanged()


@pytest.mark.parametrize(
    "argv",
    [["evaluate", "{run}"], ["evaluate", "{run}", "--out", "{tmp}/results"], ["sample", "{run}"], ["compare", "{run}"]],
    ids=["evaluate", "evaluate --out", "sample", "compare"],
)
def test_a_run_whose_training_has_just_begun_is_in_progress(tmp_path, capsys, argv):
    run = tmp_path / "run"
    with RunFolder(run).locked("train"):  # a training's first moment: its lock, and no other file yet
        assert [p.name for p in run.iterdir()] == [".lock"]
        refused(capsys, [a.format(run=run, tmp=tmp_path) for a in argv], "its run is in progress, in its first epoch", f"process {os.getpid()} is training it")
        assert [p.name for p in run.iterdir()] == [".lock"]
    assert not (tmp_path / "results").exists()
