"""Issue 24: outputs that cannot clobber a run, labels that say what they are, memory that is counted.

Every refusal on the command line is one stderr line ``pyro-vae: error: ...`` and exit status 2,
with every file of the run folder byte-identical afterwards (the helpers of
:mod:`tests.test_run_folder_faults`: one small run trained per module, copied for each test).
"""

import json

import pytest
import torch

from pyro_vae.run import RunFolder

from .test_run_folder_faults import TINY, data, folder, refused, succeeds, trained  # noqa: F401 - fixtures

# ------------------------------------------------------------- 1: outputs that replace the run's files


def test_sample_out_never_replaces_a_file_of_the_run(folder, capsys):
    names = sorted(p.name for p in folder.path.iterdir()) + [".x.tmp", ".config.json.previous.tmp", "evaluation-data-0123.json"]
    assert {"checkpoint.pt", ".lock", "inference_data.nc"} <= set(names)
    for name in names:
        out = folder.path / name
        refused(capsys, ["sample", folder.path, "--out", out], f"--out {out} would replace {name}, one of the run's own files")
    roundabout = folder.path.parent / "." / "run" / ".." / "run" / "checkpoint.pt"
    refused(capsys, ["sample", folder.path, "--out", roundabout], "would replace checkpoint.pt")
    refused(capsys, ["sample", folder.path, "--out", folder.path], f"--out {folder.path} is the run folder")
    folder.assert_unchanged()


def test_sample_out_through_a_link_to_the_run_folder_is_refused(folder, capsys):
    link = folder.path.parent / "link"
    link.symlink_to(folder.path)
    refused(capsys, ["sample", link, "--out", folder.path / "metrics.jsonl"], "would replace metrics.jsonl")
    refused(capsys, ["sample", folder.path, "--out", link / "config.json"], "would replace config.json")
    folder.assert_unchanged()


def test_sample_out_with_a_new_name_in_the_run_folder_is_written(folder, capsys):
    out = succeeds(capsys, ["sample", folder.path, "--num", "4", "--device", "cpu", "--out", folder.path / "mine.png"])
    assert "written" in out and (folder.path / "mine.png").stat().st_size > 0
    (folder.path / "mine.png").unlink()
    folder.assert_unchanged()


def test_compare_out_is_never_the_run_folder_or_one_of_its_files(folder, capsys):
    refused(capsys, ["compare", folder.path, "--out", folder.path, "--repeats", "2", "--particles", "1"], f"--out {folder.path} is the run folder")
    out = folder.path / "checkpoint.pt"
    refused(capsys, ["compare", folder.path, "--out", out, "--repeats", "2", "--particles", "1"], "would replace checkpoint.pt")
    folder.assert_unchanged()


# ---------------------------------------------------------- 2: config.json and checkpoint disagree


def edit_config(folder, **changes):
    path = folder.path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))
    folder.remember()


def test_evaluate_and_sample_say_that_config_json_disagrees_and_use_the_checkpoint(folder, capsys):
    edit_config(folder, lr=0.5, z_dim=7)
    for argv in (["evaluate", folder.path, "--num-samples", "2", "--idata-points", "2", "--device", "cpu", "--no-progress"],
                 ["sample", folder.path, "--num", "4", "--device", "cpu", "--out", folder.path.parent / "s.png"]):
        capsys.readouterr()
        assert main_ok(argv)
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pyro-vae: warning:")]
        assert len(warnings) == 1, warnings
        assert "config.json disagrees with its checkpoint (z_dim: 2 in the checkpoint, 7 in config.json, lr: 0.001 in the checkpoint, 0.5 in config.json)" in warnings[0]
    assert json.loads((folder.path / "config.json").read_text())["z_dim"] == 7  # the edit is the user's: kept


def main_ok(argv) -> bool:
    from pyro_vae.cli import main

    return main([str(a) for a in argv]) == 0


@pytest.mark.parametrize("text,fragment", [
    (None, "lr: 0.001 in the checkpoint, 0.01 in config.json"),
    ("{not json", "config.json cannot be read as JSON"),
    ("[1, 2]", "config.json is not a mapping of settings"),
])
def test_resume_refuses_to_overwrite_an_edited_config_json(folder, data, capsys, text, fragment):
    if text is None:
        edit_config(folder, lr=0.01)
    else:
        (folder.path / "config.json").write_text(text)
        folder.remember()
    argv = ["train", "--resume", "--run-dir", folder.path, "--data-dir", data / "idx", "--no-progress", "--epochs", "2"]
    refused(capsys, argv, "cannot resume", fragment, "or delete config.json to resume as saved")
    folder.assert_unchanged()


def test_a_config_json_that_agrees_or_is_absent_says_nothing(folder):
    state = folder.state()
    assert RunFolder(folder.path).config_file_disagreement(state["config"]) is None
    (folder.path / "config.json").unlink()
    assert RunFolder(folder.path).config_file_disagreement(state["config"]) is None


@pytest.mark.parametrize("part", ["model", "optimizer"])
def test_a_checkpoint_tensor_of_the_wrong_dtype_is_refused_like_a_wrong_shape(folder, capsys, part):
    state = folder.state()
    if part == "model":
        name = next(iter(state["model"]))
        state["model"][name] = state["model"][name].double()
        fragment = f"{name} is torch.float64, the model's torch.float32"
    else:
        entries = state["optimizer"]["state"][0]
        entries["exp_avg"] = entries["exp_avg"].double()
        fragment = "exp_avg is torch.float64, its parameter torch.float32"
    folder.save_state(state)
    refused(capsys, ["evaluate", folder.path, "--num-samples", "2", "--device", "cpu", "--no-progress"], fragment, "the run folder is damaged")
    folder.assert_unchanged()


# ------------------------------------------------------- 3: the train ELBO under KL annealing


@pytest.mark.parametrize("estimator", ["meanfield", "iwae"])
def test_train_elbo_under_kl_annealing_is_the_elbo_and_the_objective_has_its_own_name(tmp_path, data, estimator):
    """A real annealed epoch (traced step, as the command runs it) with a learning rate below float32's
    resolution, so every step sees the initial parameters (to 1e-10). Replaying the epoch's draws (torch's RNG
    from where training started) through the plain Pyro loss gives what each label must be: at
    weight 1 the ELBO, at the step's weight the KL-weighted objective; the two differ by
    (1 - beta) KL, which before this fix was logged as the train ELBO."""
    from pyro_vae import TrainConfig
    from pyro_vae.estimators import make_elbo
    from pyro_vae.kl_weight import elbo_loss
    from pyro_vae.train import Trainer

    config = TrainConfig(dataset="mnist", data_dir=str(data / "idx"), hidden=(32,), z_dim=20, batch_size=32, epochs=1, lr=1e-12,
                         kl_anneal_epochs=2, estimator=estimator, num_particles=3, step="traced", device="cpu")
    trainer = Trainer(config, tmp_path / "run", progress=False)
    initial = {k: v.clone() for k, v in trainer.vae.state_dict().items()}
    start = torch.get_rng_state()
    trainer.fit()
    assert max((v - initial[k]).abs().max().item() for k, v in trainer.vae.state_dict().items()) < 1e-10  # Adam's steps are ~lr
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())

    torch.set_rng_state(start)
    elbo, unweighted, weighted, n = make_elbo(estimator, 3), 0.0, 0.0, 0
    with torch.no_grad():
        for step, (x, _) in enumerate(trainer.train_batches.epoch(0)):
            draws = torch.get_rng_state()
            unweighted += elbo_loss(elbo, trainer.vae.model, trainer.vae.guide, x, 1.0).item()
            torch.set_rng_state(draws)
            weighted += elbo_loss(elbo, trainer.vae.model, trainer.vae.guide, x, trainer.kl_weight(0, step)).item()
            n += x.shape[0]
    assert n == 128 and row["kl_weight"] == 0.5
    # float32 sums of ~550-nat terms: the traced graph and eager Pyro agree to ~1e-4 nats per image
    assert row["train_elbo"] == pytest.approx(-unweighted / n, abs=2e-3)
    assert row["train_objective"] == pytest.approx(-weighted / n, abs=2e-3)
    assert row["train_objective"] - row["train_elbo"] > 0.5  # (1 - beta) KL with beta <= 1/2: what the old label hid


@pytest.mark.parametrize("guide", ["gaussian", "iaf"])
def test_the_annealing_gap_without_an_analytic_kl_is_one_minus_beta_times_the_kl_within_its_standard_error(
    tmp_path, data, guide
):
    """A VampPrior has no analytic KL: the gap ELBO_beta - ELBO is (1 - beta) (log q(z|x) - log p(z))
    at a draw of its own. Its mean over 400 calls against the KL by hand (q from the encoder, p the
    mixture of the encoder's Gaussians at the pseudo-inputs, written from the formulas), within 4
    standard errors of the two Monte Carlo means; training's RNG is left where it was."""
    import math

    from pyro_vae import TrainConfig
    from pyro_vae.train import Trainer

    config = TrainConfig(dataset="mnist", data_dir=str(data / "idx"), hidden=(32,), z_dim=3, batch_size=8, epochs=1,
                         prior="vamp", pseudo_inputs=5, guide=guide, kl_anneal_epochs=2, device="cpu")
    with Trainer(config, tmp_path / "run", progress=False) as trainer:
        vae, x = trainer.vae, next(trainer.train_batches.epoch(0))[0]
        torch.manual_seed(0)
        with torch.no_grad():  # untrained, every q(z|x) is close to every component: spread them apart
            for parameter in vae.encoder.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        gaps = []
        for seed in range(400):  # training calls it at a new place in the stream every step
            torch.manual_seed(seed)
            gaps.append(trainer.objective_gap(x, 0.25))
            assert torch.equal(torch.get_rng_state(), torch.manual_seed(seed).get_state())
        gaps = torch.stack(gaps).double() / 0.75
    with torch.no_grad():
        q = vae.posterior(x)
        z = q.sample((20000,))
        log_q = q.log_prob(z).double()
        loc, scale = (t.double() for t in vae.encoder(vae.prior_family.pseudo_inputs)[:2])
        zd = z.double().unsqueeze(-2)  # (draws, images, 1, z_dim) against (K, z_dim)
        log_components = (-0.5 * ((zd - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_p = torch.logsumexp(log_components, -1) - math.log(5)
        kl_draws = (log_q - log_p).sum(-1)  # per draw, summed over the batch as the gap is
    se = math.sqrt(gaps.var().item() / len(gaps) + kl_draws.var().item() / len(kl_draws))
    assert abs(gaps.mean().item() - kl_draws.mean().item()) < 4 * se
    assert kl_draws.mean().item() > 10 * se  # a KL well away from zero: the comparison has power


def test_an_unannealed_epoch_logs_no_separate_objective(tmp_path, data, capsys):
    from pyro_vae.cli import main

    assert main(["train", *TINY, "--epochs", "2", "--kl-anneal-epochs", "1", "--data-dir", str(data / "idx"), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "train_objective" in rows[0] and "train_objective" not in rows[1] and rows[1]["kl_weight"] == 1.0


# ----------------------------------------------------------------- 4: results on other data


def test_evaluate_on_other_data_never_replaces_the_runs_own_results_and_every_file_names_its_data(folder, data, capsys):
    import arviz

    own_data = folder.state()["data"]
    argv = ["evaluate", folder.path, "--num-samples", "2", "--idata-points", "3", "--device", "cpu", "--no-progress"]
    out = succeeds(capsys, [*argv, "--data-dir", data / "other", "--allow-different-data"])
    fp = json.loads(next(folder.path.glob("evaluation-on-*.json")).read_text())["data"]["fingerprint"]
    assert sorted(set(folder.files()) - set(folder.before)) == [f"evaluation-on-{fp}.json", f"inference_data-on-{fp}.nc"]
    assert fp != own_data["fingerprint"] and "the run's own evaluation.json is left as it was" in out
    for name, content in folder.before.items():  # evaluation.json and inference_data.nc included
        assert folder.files()[name] == content, name
    assert json.loads((folder.path / f"evaluation-on-{fp}.json").read_text())["data"]["source"].endswith(str(data / "other"))
    assert arviz.from_netcdf(folder.path / f"inference_data-on-{fp}.nc").attrs["data_fingerprint"] == fp

    succeeds(capsys, argv)  # the run's own data: its own files, which say so too
    assert json.loads((folder.path / "evaluation.json").read_text())["data"] == own_data
    attrs = arviz.from_netcdf(folder.path / "inference_data.nc").attrs
    assert (attrs["data_source"], attrs["data_fingerprint"]) == (own_data["source"], own_data["fingerprint"])


# --------------------------------------------------------- 5: one importance sample, one image


@pytest.mark.parametrize("k", [1, 0, -3])
def test_too_few_importance_samples_are_refused_alike_by_the_command_and_the_library(folder, capsys, k):
    """One message for every K below the minimum, the command's the library's word for word: it names
    the minimum and why (one weight is a one-sample ELBO, with no spread for a standard error)."""
    from pyro_vae import ConfigError
    from pyro_vae.checks import MIN_IMPORTANCE_SAMPLES
    from pyro_vae.evaluate import evaluate_model
    from pyro_vae.run import load_run

    assert MIN_IMPORTANCE_SAMPLES == 2
    err = refused(capsys, ["evaluate", folder.path, "--num-samples", k, "--device", "cpu", "--no-progress"], f"got {k}")
    folder.assert_unchanged()
    run = load_run(folder.path, "cpu")
    with pytest.raises(ConfigError) as library:
        evaluate_model(run.vae, run.test_split(), seed=0, num_samples=k)
    message = str(library.value)
    assert err == f"pyro-vae: error: {message}\n"
    assert message.startswith(f"num_samples (--num-samples) must be at least 2, got {k}: with one importance sample the estimate of log p(x) is a one-sample ELBO")
    assert "standard error" in message and "pass 2 or more" in message


def test_active_units_of_one_test_image_are_not_measurable_rather_than_zero(tmp_path, data, capsys):
    run = tmp_path / "run"
    succeeds(capsys, ["train", *TINY, "--epochs", "1", "--max-train", "32", "--max-test", "1", "--data-dir", data / "idx", "--run-dir", run])
    out = succeeds(capsys, ["evaluate", run, "--num-samples", "3", "--device", "cpu", "--no-progress"])
    assert "active units         not measurable from one test image" in out and "(one image: no standard error)" in out
    assert "PSIS k-hat           not fitted: K=3 is too few" in out and "bad (>0.7" not in out
    record = json.loads((run / "evaluation.json").read_text())
    assert record["test_images"] == 1 and record["active_units"] is None


# --------------------------------------------------------------- 6: memory that is counted


def test_train_refuses_a_model_whose_parameters_and_adam_state_exceed_memory_before_allocating_it(tmp_path, data, capsys):
    """Parameters, gradients and Adam's two moments are 16 bytes a parameter: a width that makes
    them twice the machine's memory is refused, naming the model's flags, and this process's peak
    memory grows by far less than one copy of the parameters (the model is sized on the meta device;
    building it for real would raise the peak by a quarter of the machine's memory)."""
    import math
    import resource

    from pyro_vae.memory import available_memory

    memory = available_memory(torch.device("cpu"))
    width = math.ceil(2 * memory / (16 * (784 + 3 * 20 + 784)))  # 784 -> width -> 2 x 20; 20 -> width -> 784
    one_copy = 4 * width * (784 + 3 * 20 + 784)
    for flags in (["--hidden", width], ["--z-dim", 100_000_000]):
        run = tmp_path / f"run{flags[0]}"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        refused(capsys, ["train", *TINY, *flags, "--data-dir", data / "idx", "--run-dir", run], "with a model of", "lower --hidden, --z-dim, --num-particles or --batch-size")
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak < one_copy / 4
        assert not run.exists()


def test_evaluate_export_and_sample_decode_no_more_draws_at_once_than_the_memory_check_counts():
    """The check counts ``chunk x batch`` draws of z (evaluate) and ``GENERATE_CHUNK_SIZE`` (sample);
    a hook on the decoder sees every call: none may decode more (today's code decoded the whole
    test split, and ``num_draws x images`` for the ArviZ export, at once)."""
    from pyro_vae import VAE
    from pyro_vae.data import DeviceBatches
    from pyro_vae.evaluate import evaluate_model, export_inference_data
    from pyro_vae.model import GENERATE_CHUNK_SIZE

    vae = VAE(hidden=(8,), z_dim=2).eval()
    seen = []
    vae.decoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].numel() // vae.z_dim))
    images = torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8)
    batches = DeviceBatches(images, torch.zeros(100, dtype=torch.long), 10, binarization="dynamic", seed=0, shuffle=False)
    result = evaluate_model(vae, batches, seed=0, num_samples=3, chunk_size=2, keep_log_weights=50)
    export_inference_data(vae, batches, result, chunk_size=2, num_draws=10)  # two images at a time
    assert len(seen) > 30 and max(seen) <= 2 * 10, max(seen)
    seen.clear()
    assert vae.generate(600).shape == (600, 784)
    assert max(seen) == GENERATE_CHUNK_SIZE and sum(seen) == 600


def test_the_out_of_memory_line_names_only_options_the_command_has():
    from pyro_vae.cli import parser

    commands = parser()._subparsers._group_actions[0].choices
    for name, command in commands.items():
        named = command.get_default("memory_options").replace(" or ", ", ").split(", ")
        assert named and set(named) <= set(command._option_string_actions), (name, named)
