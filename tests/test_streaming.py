"""Data over the memory budget stream from disk through DataLoader workers, with the very batches,
fingerprint and results of device-resident data; the workers end with every pass, also a failed one."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_vae.config import TrainConfig
from pyro_vae.data import DeviceBatches, load_dataset
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.lazy_images import LazyImages
from pyro_vae.memory import data_memory_budget
from pyro_vae.run import split_batches
from pyro_vae.streaming import StreamedBatches
from pyro_vae.train import Trainer, train

# the tests ask for 2 workers whatever the cores they are pinned to
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def image_folder(folder: Path, n=40, side=6, colour=True) -> Path:
    """``n`` images in two class subfolders, PNG and JPEG, a few grey among colour ones."""
    rng = np.random.default_rng(3)
    for i in range(n):
        grey = not colour or i % 7 == 0
        pixels = rng.integers(0, 256, (side, side) if grey else (side, side, 3), dtype=np.uint8)
        path = folder / ("a" if i % 2 else "b") / f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return folder


def npy_file(path: Path, n=40) -> Path:
    np.save(path, np.random.default_rng(4).integers(0, 256, (n, 5, 7, 3), dtype=np.uint8))  # NHWC
    return path


def sources(tmp_path, kind):
    """The data set ``kind`` read whole and left on disk (a budget of 0 bytes)."""
    path = image_folder(tmp_path / "images") if kind == "folder" else npy_file(tmp_path / "x.npy")
    whole, streamed = (load_dataset(kind, path, memory_budget=budget, progress=False) for budget in (None, 0))
    assert not whole.streamed and streamed.streamed and isinstance(streamed.train_images, LazyImages)
    return whole, streamed


def every_batch(batches):
    out = [list(batches.epoch(e)) for e in (0, 1)] + [list(batches.eval_batches())]
    return out + [[(batches.full(), None)]] + ([[(batches.levels(), None)]] if batches.eight_bit else [])


def assert_same_batches(a, b):
    assert len(a) == len(b) and a.image_shape == b.image_shape and a.eight_bit == b.eight_bit
    for pass_a, pass_b in zip(every_batch(a), every_batch(b), strict=True):
        assert len(pass_a) == len(pass_b)
        for (x, y), (u, v) in zip(pass_a, pass_b):
            assert x.dtype == u.dtype == torch.float32 and torch.equal(x, u)  # every bit
            assert (y is None and v is None) or torch.equal(y, v)


@pytest.mark.parametrize(
    "kind, binarize, workers",
    [
        ("folder", "dynamic", 2),
        ("folder", "dequantize", 0),
        ("folder", "threshold", 0),
        ("array", "dequantize", 2),
        ("array", "none", 0),
        ("array", "dynamic", 0),
    ],
)
def test_streamed_batches_are_the_device_resident_ones_bit_for_bit(tmp_path, kind, binarize, workers):
    whole, streamed = sources(tmp_path, kind)
    assert streamed.fingerprint() == whole.fingerprint()  # pixels, labels and the files, read a chunk at a time
    config = TrainConfig(
        dataset=kind,
        likelihood="bernoulli" if binarize in ("dynamic", "threshold") else "discretized_logistic",
        binarize=binarize,
        architecture="conv" if binarize == "none" else "mlp",
        batch_size=7,
        validation_size=5,
        seed=11,
        data_workers=workers,
    )
    for split in ("train", "validation", "test"):
        resident = split_batches(config, whole, split, torch.device("cpu"))
        read = split_batches(config, streamed, split, torch.device("cpu"))
        assert isinstance(resident, DeviceBatches) and isinstance(read, StreamedBatches)
        assert read.num_workers == workers
        assert_same_batches(resident, read)
    assert not multiprocessing.active_children()  # every pass's workers are gone


def test_streamed_batches_from_a_tensor_drop_the_last_batch_as_device_resident_ones_do():
    images = torch.randint(0, 256, (23, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(23)
    options = dict(binarization="dynamic", seed=2, drop_last=True, flatten=False)
    resident, read = DeviceBatches(images, labels, 5, **options), StreamedBatches(images, labels, 5, **options)
    assert len(read) == 4 and [x.shape[0] for x, _ in read.epoch(0)] == [5] * 4
    assert_same_batches(resident, read)


def test_the_memory_budget_decides_what_streams(tmp_path):
    assert data_memory_budget(1.5) == int(1.5 * 2**30) and 0 < data_memory_budget() < 2**63 - 1
    folder = image_folder(tmp_path / "images")
    size = load_dataset("folder", folder, progress=False).nbytes
    assert size == 40 * 3 * 6 * 6  # one colour image makes every image RGB
    assert not load_dataset("folder", folder, memory_budget=size, progress=False).streamed
    assert load_dataset("folder", folder, memory_budget=size - 1, progress=False).streamed
    array = npy_file(tmp_path / "x.npy")
    assert not load_dataset("array", array, memory_budget=array.stat().st_size, progress=False).streamed
    assert load_dataset("array", array, memory_budget=array.stat().st_size - 1, progress=False).streamed
    config = TrainConfig(dataset="folder", data_dir=str(folder), data_memory=0, binarize="dynamic")
    with Trainer(config, tmp_path / "run", progress=False) as trainer:
        assert isinstance(trainer.train_batches, StreamedBatches) and trainer.dataset.streamed
        assert trainer.train_batches.reading.startswith(", streamed from disk by ")  # what the command line says
    with pytest.raises(ConfigError, match="data_memory must be a number of GiB >= 0"):
        TrainConfig(data_memory=-1.0).validate()


def test_static_binarization_of_streamed_data_is_refused_with_the_way_out(tmp_path):
    config = TrainConfig(
        dataset="folder", data_dir=str(image_folder(tmp_path / "images")), data_memory=0, binarize="static"
    )
    with pytest.raises(ConfigError, match="choose --binarize dynamic or threshold, or raise --data-memory") as error:
        Trainer(config, tmp_path / "run", progress=False)
    assert len(str(error.value).splitlines()) == 1 and not (tmp_path / "run").exists()


def test_the_workers_end_with_an_abandoned_pass_and_a_failed_one(tmp_path):
    folder = image_folder(tmp_path / "images", colour=False)
    dataset = load_dataset("folder", folder, memory_budget=0, progress=False)
    batches = StreamedBatches(dataset.train_images, dataset.train_labels, 4, num_workers=2)
    epoch = batches.epoch(0)
    next(epoch)
    assert len(multiprocessing.active_children()) == 2
    epoch.close()  # abandoned mid-epoch
    assert not multiprocessing.active_children()
    victim = folder / "a" / "001.png"
    victim.unlink()  # a file gone after the folder was read
    with pytest.raises(DataError, match=f"cannot read {victim}") as error:
        list(batches.epoch(0))
    assert len(str(error.value).splitlines()) == 1
    assert not multiprocessing.active_children()


def test_a_run_on_streamed_data_gives_the_metrics_of_device_resident_data_and_leaves_no_worker(tmp_path):
    folder = image_folder(tmp_path / "images", n=48, colour=False)
    base = dict(dataset="folder", data_dir=str(folder), hidden=(8,), z_dim=2, batch_size=8, epochs=1, step="eager")
    resident = train(TrainConfig(**base), tmp_path / "resident", progress=False)
    streamed = train(TrainConfig(**base, data_memory=0, data_workers=2), tmp_path / "streamed", progress=False)
    assert streamed == resident  # every float, on CPU
    assert not multiprocessing.active_children()


def test_evaluation_of_a_streamed_split_is_the_in_memory_one_to_the_bit(tmp_path):
    """evaluate_model reads a split batch by batch, so a test split left on disk gives every number of
    the same split in memory: log-weights, log p(x), the dequantized bound, the ELBO's terms, active units."""
    from pyro_vae.evaluate import evaluate_model, export_inference_data
    from pyro_vae.model import build_vae
    from pyro_vae.run import config_for_data

    array = npy_file(tmp_path / "x.npy", n=60)
    whole, streamed = (load_dataset("array", array, test_fraction=0.35, memory_budget=b, progress=False) for b in (None, 0))
    config = TrainConfig(dataset="array", likelihood="normal", hidden=(8,), z_dim=3, batch_size=8, data_workers=0)
    config = config_for_data(config, whole)
    resident, read = (split_batches(config, d, "test", torch.device("cpu")) for d in (whole, streamed))
    assert isinstance(resident, DeviceBatches) and isinstance(read, StreamedBatches)
    assert resident.size == 21 and len(resident) == 3  # the last batch short
    torch.manual_seed(0)
    vae = build_vae(config)
    results, exports = [], []
    for batches in (resident, read):
        results.append(evaluate_model(vae, batches, seed=4, num_samples=5, chunk_size=3, keep_log_weights=10))
        torch.manual_seed(1)  # the export's draws come from torch's RNG
        exports.append(export_inference_data(vae, batches, results[-1], chunk_size=3))
    a, b = results
    assert a.summary() == b.summary() and a.dequantized is not None and a.active_units is not None
    for field in ("log_px", "standard_error"):
        assert torch.equal(getattr(a.log_likelihood, field), getattr(b.log_likelihood, field))
    assert torch.equal(a.log_weights, b.log_weights) and a.log_weights.shape == (5, 10)
    assert torch.equal(a.dequantized, b.dequantized)
    assert exports[0].posterior.equals(exports[1].posterior)
    assert exports[0].observed_data.equals(exports[1].observed_data)
    assert not multiprocessing.active_children()


def test_pyro_vae_evaluate_streams_a_split_over_data_memory_with_the_numbers_of_one_in_memory(tmp_path, capsys):
    from pyro_vae import load_run
    from pyro_vae.cli import main

    array = npy_file(tmp_path / "x.npy", n=60)
    run = tmp_path / "run"
    args = ["--dataset", "array", "--data-dir", str(array), "--test-fraction", "0.35", "--likelihood", "normal"]
    args += ["--hidden", "8", "--z-dim", "3", "--batch-size", "8", "--epochs", "1", "--step", "eager", "--no-progress"]
    assert main(["train", *args, "--data-memory", "0", "--data-workers", "0", "--run-dir", str(run)]) == 0
    assert isinstance(load_run(run, "cpu").test_split(), StreamedBatches)  # the run's budget: evaluate streams
    evaluate = ["evaluate", str(run), "--num-samples", "4", "--chunk-size", "3", "--idata-points", "5", "--no-progress"]
    records, said = [], []
    for budget in ([], ["--data-memory", "1"]):  # the run's own budget of 0 GiB, then 1 GiB: in memory
        capsys.readouterr()
        assert main([*evaluate, *budget]) == 0
        said.append(capsys.readouterr().out.splitlines()[0])
        records.append(json.loads((run / "evaluation.json").read_text()))
    assert said == [f"data: numpy file {array}, streamed from disk by 0 DataLoader workers (over the memory budget)",
                    f"data: numpy file {array}"]
    assert records[0] == records[1] and records[0]["test_images"] == 21
    assert records[0]["dequantized_log_likelihood"] is not None  # the 8-bit levels were read, batch by batch too


def cli(*args):
    return [sys.executable, "-m", "pyro_vae.cli", *args]


@pytest.mark.slow  # about 30 s: two CLI trainings and a resume, on a folder streamed by two workers
def test_a_streamed_run_killed_by_sigkill_mid_epoch_resumes_to_the_same_metrics(tmp_path):
    folder = image_folder(tmp_path / "images", n=400, side=8, colour=False)
    args = ["train", "--dataset", "folder", "--data-dir", str(folder), "--hidden", "64", "--z-dim", "4"]
    args += ["--batch-size", "8", "--epochs", "4", "--no-progress", "--seed", "3", "--step", "eager"]
    args += ["--data-memory", "0", "--data-workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *more: subprocess.run(cli(*more), env=env, check=True, capture_output=True, timeout=300)  # noqa: E731
    run(*args, "--run-dir", str(tmp_path / "straight"))
    victim = subprocess.Popen(cli(*args, "--run-dir", str(tmp_path / "killed")), env=env, start_new_session=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline and victim.poll() is None, "the run never wrote its first epoch"
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch, its workers reading
    os.killpg(victim.pid, signal.SIGKILL)  # the trainer and its workers, as a machine that loses power
    victim.wait(timeout=60)
    done = metrics.read_text().count("\n")
    assert 1 <= done < 4, "the kill must land mid-run for this test to mean anything"
    run("train", "--resume", "--run-dir", str(tmp_path / "killed"), "--no-progress")
    read = lambda name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read("killed") == read("straight")
