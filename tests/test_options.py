"""The registry of likelihoods, priors and guides (pyro_vae.options): every setting is a flag, a
field and a keyword read by its own option only, and a new option is its class and one entry
(examples/plugins/laplace_likelihood.py, run in a fresh interpreter as a user would)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_vae import VAE, ConfigError, TrainConfig
from pyro_vae.cli import parser
from pyro_vae.model import build_vae
from pyro_vae.options import KINDS, Option, Setting, choices, option, register, settings

from .idx_files import write_dataset

REPO = Path(__file__).resolve().parents[1]


def train_help() -> str:
    subcommands = next(a for a in parser()._actions if a.dest == "command")
    return subcommands.choices["train"].format_help()


@pytest.mark.parametrize("owner, setting", list(settings()), ids=lambda v: getattr(v, "name", ""))
def test_every_setting_is_a_flag_a_field_and_a_keyword_read_by_its_own_option_only(owner, setting):
    assert f"for --{owner.kind} {owner.name}: {setting.help}" in " ".join(train_help().split())
    chosen = TrainConfig(**{owner.kind: owner.name})
    assert getattr(chosen, setting.name) == setting.default and setting.name in chosen.identity()
    other = next(name for name in choices(owner.kind) if name != owner.name)
    assert setting.name not in TrainConfig(**{owner.kind: other}).identity()
    with pytest.raises(ConfigError, match=f"{setting.flag} is for --{owner.kind} {owner.name}; this run's"):
        TrainConfig(**{owner.kind: other}).check_options_given({setting.name})
    chosen.check_options_given({setting.name})


def test_build_vae_hands_each_option_its_settings():
    config = TrainConfig(
        likelihood="normal", normal_scale=0.5, prior="vamp", pseudo_inputs=3, guide="iaf", flow_steps=3
    )
    vae = build_vae(TrainConfig(**{**config.to_dict(), "hidden": (8,), "z_dim": 2}))
    assert float(vae.likelihood.fixed_scale) == 0.5 and vae.prior_family.pseudo_inputs.shape[0] == 3
    assert len(vae.guide_family.flows) == 3 and (vae.prior_name, vae.guide_name) == ("vamp", "iaf")


@pytest.mark.parametrize("kind", KINDS)
def test_an_unknown_name_is_refused_naming_the_registered_ones(kind):
    with pytest.raises(ConfigError, match=f"unknown {kind} 'nope'; choose one of {', '.join(choices(kind))}"):
        TrainConfig(**{kind: "nope"}).validate()
    with pytest.raises(ConfigError, match=f"unknown {kind} 'nope'"):
        VAE(x_dim=4, z_dim=2, hidden=(4,), **{kind: "nope"})


def test_a_setting_out_of_range_is_refused_by_the_config_and_the_vae_alike():
    with pytest.raises(ConfigError, match="pseudo_inputs must be an integer from 1 to 100000, got 0"):
        TrainConfig(prior="vamp", pseudo_inputs=0).validate()
    with pytest.raises(ConfigError, match="flow_steps must be an integer from 1 to 64, got 65"):
        VAE(x_dim=4, z_dim=2, hidden=(4,), guide="iaf", flow_steps=65)
    with pytest.raises(ConfigError, match="VAE has no setting flow_step; the settings are"):
        VAE(x_dim=4, z_dim=2, hidden=(4,), guide="iaf", flow_step=3)


def test_register_refuses_a_taken_name_a_taken_setting_and_a_setting_after_the_config_made_its_fields():
    normal = option("likelihood", "normal")
    with pytest.raises(ConfigError, match="the likelihood 'normal' is registered already"):
        register(normal)
    with pytest.raises(ConfigError, match="the setting 'normal_scale' of likelihood 'normal2' is taken"):
        register(Option("likelihood", "normal2", normal.cls, "", normal.settings, "density"))
    late = Setting("late_setting", 1, int, "a setting TrainConfig has no field for")
    with pytest.raises(ConfigError, match="register the option before importing pyro_vae.config"):
        register(Option("prior", "late", "pyro_vae.priors:StandardPrior", "", (late,)))
    with pytest.raises(ConfigError, match="a likelihood, and only a likelihood, has a data_kind"):
        register(Option("prior", "typed", "pyro_vae.priors:StandardPrior", "", data_kind="binary"))
    assert "normal2" not in choices("likelihood") and "late" not in choices("prior")


DRIVER = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import laplace_likelihood  # the class and its one registry entry, before pyro_vae.cli and pyro_vae.config
from pyro_vae import TrainConfig, load_run
from pyro_vae.cli import main
data, folder = sys.argv[2], sys.argv[3]
tiny = ["--dataset", "mnist", "--data-dir", data, "--hidden", "8", "--z-dim", "2", "--batch-size", "32",
        "--max-train", "64", "--max-test", "32", "--no-progress", "--device", "cpu"]
out = {}
with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):
    main(["train", "--help"])
out["help"] = " ".join(text.getvalue().split())
with contextlib.redirect_stderr(io.StringIO()) as text:
    out["other_likelihood"] = [main(["train", *tiny, "--laplace-scale", "0.3", "--run-dir", folder]), text.getvalue()]
with contextlib.redirect_stderr(io.StringIO()) as text:
    out["negative"] = [main(["train", *tiny, "--likelihood", "laplace", "--laplace-scale", "-1", "--run-dir", folder]),
                       text.getvalue()]
from pyro_vae.model import build_vae
config = TrainConfig(likelihood="laplace", laplace_scale=0.2, hidden=(8,), z_dim=2)
out["built"] = [type(build_vae(config).likelihood).__name__, float(build_vae(config).likelihood.scale)]
out["default_identity"] = sorted(TrainConfig().identity())
if sys.argv[4] == "fast":
    print(json.dumps(out))
    sys.exit(0)
with contextlib.redirect_stdout(io.StringIO()):
    out["trained"] = main(["train", *tiny, "--likelihood", "laplace", "--laplace-scale", "0.2", "--epochs", "1",
                           "--run-dir", folder])
run = load_run(folder, "cpu")
out["saved"] = [type(run.vae.likelihood).__name__, float(run.vae.likelihood.scale), run.config.laplace_scale]
with contextlib.redirect_stderr(io.StringIO()) as text:
    out["resumed_with_another_scale"] = [
        main(["train", *tiny, "--resume", "--laplace-scale", "0.3", "--epochs", "2", "--run-dir", folder]),
        text.getvalue()]
print(json.dumps(out))
"""


def run_driver(tmp_path, mode: str) -> dict:
    """The driver's findings, in a fresh interpreter that imports the example first."""
    write_dataset(tmp_path / "data", gz=True, n_train=64, n_test=32)
    args = [
        sys.executable,
        "-c",
        DRIVER,
        str(REPO / "examples" / "plugins"),
        str(tmp_path / "data"),
        str(tmp_path / "run"),
        mode,
    ]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_new_likelihood_is_its_class_and_one_registry_entry(tmp_path):
    """examples/plugins/laplace_likelihood.py adds a class and one entry; the command line offers it and its
    setting and refuses the setting with another likelihood; the config builds the model with it."""
    out = run_driver(tmp_path, "fast")
    assert "laplace, L1 reconstruction" in out["help"]
    assert "--laplace-scale LAPLACE_SCALE for --likelihood laplace" in out["help"]
    code, message = out["other_likelihood"]
    assert code == 2 and "--laplace-scale is for --likelihood laplace; this run's likelihood is bernoulli" in message
    code, message = out["negative"]
    assert code == 2 and "the Laplace scale must be a positive finite number, got -1.0" in message
    assert out["built"] == ["LaplaceLikelihood", pytest.approx(0.2)]
    assert "laplace_scale" not in out["default_identity"] and "normal_scale" not in out["default_identity"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_with_the_new_likelihood_records_its_setting_and_resumes_only_with_it(tmp_path):
    out = run_driver(tmp_path, "train")
    assert out["trained"] == 0 and out["saved"] == ["LaplaceLikelihood", pytest.approx(0.2), 0.2]
    code, message = out["resumed_with_another_scale"]
    assert code == 2 and "laplace_scale: 0.2 in the checkpoint, 0.3 now" in message
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["likelihood"] == "laplace" and saved["laplace_scale"] == 0.2
