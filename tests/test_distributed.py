"""Data-parallel training: real torchrun jobs of 2 CPU processes over gloo on loopback.

What is compared and how closely:

* the ranks of a job: bitwise (they build the model from the same seed and every rank gets the
  same summed gradient from one all-reduce, so Adam makes the same update everywhere);
* a 1-rank process group against plain single-process training: bitwise (same data, same noise,
  same reductions: the distributed code path adds no arithmetic);
* 2 ranks against a single process on the global batch: within float32 rounding. The data and the
  latent noise are matched row for row (``SuppliedNoise`` with ``rows``), so the only difference is the order
  of the sums: each gradient is the sum of two half-batch sums instead of one batch sum (relative
  difference ~1e-7), and it carries through Adam. Measured here after 28 steps: parameters differ
  by <= 4.2e-7, Adam's moments by <= 3e-7 of each tensor's largest entry, metrics by <= 1.2e-7
  relative. The test allows 1e-5 for each: 25x the measured spread, yet 100x below what one Adam
  step moves a parameter (lr = 1e-3). Adam's moments are compared because Adam itself is blind
  to the gradient's scale: averaging the ranks' gradients instead of summing would leave the
  parameters almost unchanged, but halve ``exp_avg``.
* resuming a run whose rank died: bitwise equal to the uninterrupted run (CPU, gloo: deterministic),
  and, resumed in a single process instead, equal within the tolerance above.
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae import VAE, TrainConfig, make_elbo
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.distributed import Distributed
from pyro_vae.noise import SuppliedNoise, UnsuppliableNoise
from pyro_vae.train import Trainer, train

from .idx_files import write_dataset

# 193 = 6 * 32 + 1: every epoch ends with a 1-row batch, so rank 1 has no rows there and takes
# part with a borrowed row of weight 0; "trace" with 2 vectorized particles and KL annealing
# exercise the particle plate and the per-step KL weight
CONFIG = dict(dataset="mnist", hidden=[32], z_dim=3, batch_size=32, max_test=64, epochs=4, estimator="trace", num_particles=2, kl_anneal_epochs=1.5)
CLI_ARGS = ["--dataset", "mnist", "--hidden", "32", "--z-dim", "3", "--batch-size", "32", "--max-test", "64", "--epochs", "4", "--estimator", "trace", "--num-particles", "2", "--kl-anneal-epochs", "1.5", "--no-progress"]
N_TRAIN = 193
TOLERANCE = 1e-5
LAUNCH_TIMEOUT_S = 120

# every rank runs this under torchrun: the library's Trainer, then each rank saves what it holds
DRIVER = """
import errno, json, os, sys, time
import torch
from pyro_vae import distributed
from pyro_vae import TrainConfig
from pyro_vae.train import Trainer

config, run_dir, out, poison = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
with distributed.job() as parallel, Trainer(TrainConfig(**config), run_dir, progress=False, parallel=parallel) as trainer:
    if trainer.parallel.rank in poison["ranks"]:  # a NaN in this rank's half of the batch, as an overflow would give
        calls = {"n": 0}
        def hook(module, inputs, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] - 1 in poison["calls"] else output
        trainer.vae.decoder.register_forward_hook(hook)
    if trainer.parallel.rank in poison.get("full_disk_ranks", []):  # the disk fills up as the second epoch is saved
        save_state = trainer.folder.save_state
        def save_or_fail(state):
            if len(state["metrics"]) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            save_state(state)
        trainer.folder.save_state = save_or_fail
    metrics = trainer.fit()
    returned_ns = time.time_ns()
    state = {"model": trainer.vae.state_dict(), "optimizer": trainer.optimizer.state_dict(), "rng": torch.get_rng_state(), "metrics": metrics, "returned_ns": returned_ns}
    torch.save(state, f"{out}/rank{trainer.parallel.rank}.pt")
distributed.end_process(0)  # as a script under torchrun should end: see its docstring
"""

pytestmark = pytest.mark.slow  # real torchrun processes: minutes, not seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def two_ranks(*args: str) -> list[str]:
    return torchrun("--standalone", "--nproc_per_node=2", *args)


def launch_driver(tmp: Path, data_dir: str, name: str, poison=None, **changes) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp / name
    out.mkdir()
    (tmp / "driver.py").write_text(DRIVER)
    poison = poison or {"ranks": [], "calls": []}
    config = {**CONFIG, "data_dir": data_dir, **changes}
    done = subprocess.run(two_ranks(str(tmp / "driver.py"), json.dumps(config), str(out / "run"), str(out), json.dumps(poison)), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    return out, done


def run_driver(tmp: Path, data_dir: str, name: str, poison=None, **changes) -> Path:
    out, done = launch_driver(tmp, data_dir, name, poison, **changes)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    write_dataset(path, gz=True, n_train=N_TRAIN, n_test=64)
    return str(path)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    """An uninterrupted 2-rank run through the library (every rank's final state saved)."""
    return run_driver(tmp_path_factory.mktemp("straight"), data_dir, "job")


def poison_decoder(vae, bad_calls):
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] - 1 in bad_calls else output

    vae.decoder.register_forward_hook(hook)


def single_process(tmp_path, data_dir, poisoned_calls=(), **changes):
    """The same run in one process (this one), on the global batch."""
    torch.set_num_threads(1)
    with Trainer(TrainConfig(**{**CONFIG, "data_dir": data_dir, **changes}), tmp_path / "single", progress=False) as trainer:
        poison_decoder(trainer.vae, set(poisoned_calls))
        metrics = trainer.fit()
    return metrics, load_checkpoint(tmp_path / "single" / "checkpoint.pt")


def assert_close_to_single_process(job: Path, single_metrics, single_state):
    ranks = [torch.load(job / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # the ranks: bitwise
    for k, v in ranks[0]["model"].items():
        assert torch.equal(v, ranks[1]["model"][k]), k
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    # against one process on the global batch: the same random numbers were drawn...
    assert torch.equal(ranks[0]["rng"], single_state["rng"]["torch"])
    # ...and the numbers agree within float32 reduction-order rounding
    for k, v in single_state["model"].items():
        torch.testing.assert_close(ranks[0]["model"][k], v, rtol=0, atol=TOLERANCE, msg=k)
    saved = load_checkpoint(job / "run" / "checkpoint.pt")  # what rank 0 wrote
    for i, moments in single_state["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            scale = moments[k].abs().max().item()
            torch.testing.assert_close(saved["optimizer"]["state"][i][k], moments[k], rtol=0, atol=TOLERANCE * scale, msg=f"{i} {k}")
    assert len(ranks[0]["metrics"]) == len(single_metrics) == CONFIG["epochs"]
    for ours, theirs in zip(ranks[0]["metrics"], single_metrics):
        assert ours["skipped_steps"] == theirs["skipped_steps"] and ours["kl_weight"] == theirs["kl_weight"]
        for k in ("train_elbo", "test_elbo"):
            assert ours[k] == pytest.approx(theirs[k], rel=TOLERANCE, abs=0), k
    assert saved["metrics"] == ranks[0]["metrics"]


def test_two_ranks_hold_identical_parameters_and_match_one_process_on_the_global_batch(tmp_path, data_dir, straight):
    single_metrics, single_state = single_process(tmp_path, data_dir)
    assert_close_to_single_process(straight, single_metrics, single_state)
    # the step asked for (TrainConfig's default, traced) is the step that ran on both ranks
    for r in (0, 1):
        assert {m["step"] for m in torch.load(straight / f"rank{r}.pt", weights_only=True)["metrics"]} == {"traced"}
    # rank 0 alone wrote the run folder, with everything a single-process run leaves
    files = {p.name for p in (straight / "run").iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "elbo.png", "reconstructions.png", "samples.png"} <= files
    assert not list((straight / "run").glob(".*.tmp"))
    # every rank's run() returned only once rank 0 had written all of it (a file's time stamp is
    # never later than the clock when it was written)
    last_write = max(p.stat().st_mtime_ns for p in (straight / "run").iterdir() if p.name != ".lock")
    for r in (0, 1):
        assert torch.load(straight / f"rank{r}.pt", weights_only=True)["returned_ns"] >= last_write, r


def test_a_save_that_fails_on_rank_0_stops_every_rank_with_its_reason(tmp_path, data_dir):
    out, done = launch_driver(tmp_path, data_dir, "job", poison={"ranks": [], "calls": [], "full_disk_ranks": [0]})
    assert done.returncode != 0
    checkpoint = out / "run" / "checkpoint.pt"
    told = f"rank 0 of 2 could not save the checkpoint: OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}. The last complete checkpoint is {checkpoint}; continue the run with --resume."
    assert told in done.stderr, done.stderr[-3000:]
    assert "lost contact" not in done.stderr  # rank 1 was told, it did not have to notice a dead peer
    assert len(load_checkpoint(checkpoint)["metrics"]) == 1


def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path, data_dir):
    # NaN in rank 1's half of steps 2 and 5: the global loss is NaN, so both ranks skip, exactly
    # where a single process fed the whole (poisoned) batch skips; the eager step, as a forward
    # hook runs on every call there (a traced graph runs the hook once, when it is traced)
    job = run_driver(tmp_path, data_dir, "job", poison={"ranks": [1], "calls": [2, 5]}, step="eager")
    single_metrics, single_state = single_process(tmp_path, data_dir, poisoned_calls=(2, 5), step="eager")
    assert [m["skipped_steps"] for m in single_metrics] == [2, 0, 0, 0]
    assert_close_to_single_process(job, single_metrics, single_state)


def node(rank: int, port: int, *args: str, log: Path) -> subprocess.Popen:
    """One 'machine' of a 2-node job (1 process each) on loopback: torchrun's multi-node arguments."""
    cmd = torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "pyro_vae.cli", "train", *args)
    # one process per node, so torchrun leaves OMP_NUM_THREADS alone; 1 thread, as in the standalone
    # jobs here, keeps the float results comparable bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def worker_of(agent: subprocess.Popen) -> int:
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def wait_for_first_epoch(run: Path, agents) -> None:
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + LAUNCH_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "the job never finished its first epoch"
        time.sleep(0.02)


def stop_all(agents) -> None:
    for agent in agents:  # only the process groups this test started
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)


def test_a_crashed_rank_fails_the_job_fast_with_a_clear_error_and_the_run_resumes_exactly(tmp_path, data_dir, straight):
    run, port = tmp_path / "run", free_port()
    args = [*CLI_ARGS, "--data-dir", data_dir, "--run-dir", str(run), "--dist-timeout", "60"]
    agents = [node(r, port, *args, log=tmp_path / f"node{r}.log") for r in (0, 1)]
    try:
        wait_for_first_epoch(run, agents)
        os.kill(worker_of(agents[1]), signal.SIGKILL)  # rank 1 dies, as under the OOM killer
        killed = time.monotonic()
        codes = [a.wait(timeout=LAUNCH_TIMEOUT_S) for a in agents]
        took = time.monotonic() - killed
    finally:
        stop_all(agents)
    log0 = (tmp_path / "node0.log").read_text()
    assert codes[0] != 0 and codes[1] != 0, codes
    assert took < 30, f"rank 0 took {took:.0f} s to notice"  # gloo sees the closed connection at once
    assert "pyro-vae: error (rank 0 of 2): lost contact with the other ranks" in log0, log0[-3000:]
    assert f"The last complete checkpoint is {run / 'checkpoint.pt'}; continue the run with --resume" in log0
    assert "Traceback" not in log0.split("pyro-vae: error")[0]
    assert len(load_checkpoint(run / "checkpoint.pt")["metrics"]) == 1
    # the noise does not depend on the number of processes, so a copy resumed in one process
    # continues the same run, up to float rounding
    shutil.copytree(run, tmp_path / "copy")
    torch.set_num_threads(1)
    alone = train(TrainConfig(**{**CONFIG, "data_dir": data_dir}), tmp_path / "copy", resume=True, progress=False)
    together = [json.loads(line) for line in (straight / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in alone] == [m["skipped_steps"] for m in together]
    assert [m["test_elbo"] for m in alone] == pytest.approx([m["test_elbo"] for m in together], rel=TOLERANCE, abs=0)
    # every rank loads rank 0's checkpoint, and the resumed run is the uninterrupted one, bit for bit
    done = subprocess.run(two_ranks("-m", "pyro_vae.cli", "train", "--resume", "--run-dir", str(run), "--data-dir", data_dir, "--no-progress"), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 4 epochs") == 1  # rank 0 alone prints
    assert (run / "metrics.jsonl").read_text() == (straight / "run" / "metrics.jsonl").read_text()
    ours, theirs = (load_checkpoint(p / "checkpoint.pt") for p in (run, straight / "run"))
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])


def test_a_hung_rank_makes_the_others_fail_after_the_timeout(tmp_path, data_dir):
    run, port = tmp_path / "run", free_port()
    args = [*CLI_ARGS, "--epochs", "50", "--data-dir", data_dir, "--run-dir", str(run), "--dist-timeout", "5"]
    agents = [node(r, port, *args, log=tmp_path / f"node{r}.log") for r in (0, 1)]
    try:
        wait_for_first_epoch(run, agents)
        worker = worker_of(agents[1])
        os.kill(worker, signal.SIGSTOP)  # alive, connection open, never answering: only the timeout can end the wait
        stopped = time.monotonic()
        code = agents[0].wait(timeout=LAUNCH_TIMEOUT_S)
        took = time.monotonic() - stopped
        os.kill(worker, signal.SIGKILL)
    finally:
        stop_all(agents)
    log0 = (tmp_path / "node0.log").read_text()
    assert code != 0 and 4 < took < 30, (code, took)
    assert "pyro-vae: error (rank 0 of 2): lost contact with the other ranks" in log0 and "timeout 5 s, --dist-timeout" in log0, log0[-3000:]


def test_a_rank_with_corrupt_data_stops_every_rank_at_once_with_its_reason(tmp_path, data_dir):
    # node 1's copy of the data is truncated: a real failure on one machine only
    bad = tmp_path / "bad"
    write_dataset(bad, gz=True, n_train=N_TRAIN, n_test=64)
    victim = bad / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:300])
    run, port = tmp_path / "run", free_port()
    args = [*CLI_ARGS, "--run-dir", str(run), "--dist-timeout", "300"]
    start = time.monotonic()
    agents = [node(0, port, *args, "--data-dir", data_dir, log=tmp_path / "node0.log"), node(1, port, *args, "--data-dir", str(bad), log=tmp_path / "node1.log")]
    try:
        codes = [a.wait(timeout=LAUNCH_TIMEOUT_S) for a in agents]
    finally:
        stop_all(agents)
    took = time.monotonic() - start
    log0, log1 = ((tmp_path / f"node{r}.log").read_text() for r in (0, 1))
    assert codes[0] != 0 and codes[1] != 0 and took < 60, (codes, took)  # not the 300 s timeout: rank 1 told rank 0
    assert "pyro-vae: error (rank 1 of 2): " in log1 and "train-images-idx3-ubyte.gz: gzip stream cannot be decompressed" in log1
    assert "pyro-vae: error (rank 0 of 2): rank 1 of 2 could not start training: DataError:" in log0 and "train-images-idx3-ubyte.gz" in log0
    assert not run.exists()  # nothing written


# ---- in one process: the machinery itself ----


def test_shards_cover_each_batch_once_and_empty_shards_borrow_a_row_with_weight_zero():
    for world in (1, 2, 3, 4):
        for n in range(1, 12):
            shards = [Distributed(rank, world, rank, "gloo", None).shard(n) for rank in range(world)]
            real = [(a, b) for a, b, w in shards if w == 1.0]
            assert [i for a, b in real for i in range(a, b)] == list(range(n))
            assert all((a, b) == (0, 1) for a, b, w in shards if w == 0.0)
            assert len(real) == min(n, world)


@pytest.mark.parametrize("particles", [1, 3])
def test_supplied_noise_gives_each_shard_the_draws_of_the_whole_batch(particles):
    # an elementwise guide, so that z = loc + eps * scale compares bit for bit (an encoder's matmul
    # may round a 3-row batch differently from a 7-row one)
    x = torch.randn(7, 2)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample("z", dist.Normal(x, x.exp()).to_event(1))

    def z(rows=None):
        plate = pyro.plate("num_particles_vectorized", particles, dim=-2) if particles > 1 else contextlib.nullcontext()
        handler = SuppliedNoise(rows=(*rows, 7)) if rows else contextlib.nullcontext()
        with handler, plate:  # as under the ELBO: the noise handler outside every plate
            return poutine.trace(guide).get_trace(x[rows[0] : rows[1]] if rows else x).nodes["z"]["value"]

    torch.manual_seed(1)
    whole = z()
    after_whole = torch.get_rng_state()
    assert whole.shape == ((particles,) if particles > 1 else ()) + (7, 2)
    for rows in [(0, 3), (3, 7), (6, 7)]:
        torch.manual_seed(1)
        assert torch.equal(z(rows), whole[..., rows[0] : rows[1], :])
        assert torch.equal(torch.get_rng_state(), after_whole)  # the RNG advanced as for the whole batch


def test_supplied_noise_for_rows_refuses_sites_it_cannot_match():
    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("c", dist.Bernoulli(0.5 * torch.ones_like(x[:, 0])))

    with pytest.raises(UnsuppliableNoise, match="'c'.*cannot be supplied"), SuppliedNoise(rows=(0, 2, 4)):
        guide(torch.zeros(2, 3))


def test_a_one_rank_process_group_trains_bit_for_bit_like_a_single_process(tmp_path, data_dir, monkeypatch):
    torch.set_num_threads(1)
    config = dict(CONFIG, data_dir=data_dir, epochs=2)
    single = train(TrainConfig(**config), tmp_path / "single", progress=False)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    group = train(TrainConfig(**config), tmp_path / "group", progress=False)  # a process group, its collectives
    assert group == single
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("single", "group"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_the_elbo_of_shards_sums_to_the_elbo_of_the_batch():
    vae = VAE(x_dim=6, z_dim=2, likelihood="bernoulli", hidden=(8,))
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    elbo = make_elbo("iwae", 4)
    torch.manual_seed(2)
    whole = elbo.differentiable_loss(vae.model, vae.guide, x)
    parts = []
    for a, b in [(0, 2), (2, 5)]:
        torch.manual_seed(2)
        with SuppliedNoise(rows=(a, b, 5)):
            parts.append(elbo.differentiable_loss(vae.model, vae.guide, x[a:b]))
    torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=0)
