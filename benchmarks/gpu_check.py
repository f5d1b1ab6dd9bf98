"""The GPU check: every check that needs a GPU, as one command that stays under 9 minutes.

    python benchmarks/gpu_check.py --device cuda --out gpu-check             # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu-check  # every part at toy sizes

First a preflight: the packages of ``pyproject.toml`` (and its ``test`` extra) installed in the
versions it asks for and importable (a torchvision built for another torch fails to import), the
device (and NCCL on a GPU), and the Fashion-MNIST files. Anything missing is named on one line and
nothing runs (exit status 2). Then the parts, one after another, each in its own process group
with its own time limit (killed there, the check goes on with the next one), all within
``--budget`` seconds:

* ``tests``: the test suite's device-aware subset (``pytest -m "device and not slow" --device DEV``);
* ``step_time``: ``step_time.py``, hand-written eager and compiled against pyro-vae eager, traced
  and compiled, batch 128 and 1024, K = 1 and 16, side by side in one run;
* ``loglik``: ``loglik_throughput.py``, importance-sampled log p(x) against the matmul rate;
* ``readme``, ``torchrun``, ``resume``: ``training_checks.py``: the README's training command, a
  one-process ``torchrun`` job (NCCL on a GPU) against one plain process, and a run killed by
  SIGKILL after its first checkpoint, resumed and compared bit for bit with an uninterrupted one.

It prints one verdict line per part and writes ``DIR/gpu_check.json`` (every part's verdict,
figures and output tail), ``DIR/gpu_check.md`` (the tables for ``docs/benchmarks.md``) and
``DIR/gpu_check.log`` (every part's whole output); run folders and other scratch go to a temporary
folder, removed at the end. Exit status 0 when every part passed, 1 otherwise. ``--quick`` runs
every part at toy sizes (the cheap tests of one file, tiny step-time configurations without the
inductor candidates, a few hundred training images): about 2 minutes of CPU time in all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gpu_check_report import markdown

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
GRACE_S = 10  # after its limit a part gets SIGTERM (torchrun passes it to its workers), then SIGKILL
MODULES = {"pyro-ppl": "pyro"}  # distribution -> module, where they differ
UNUSED = {"pytest-xdist"}  # requirements the check does without: it runs the tests in one process


@dataclass
class Part:
    """One part: its command (``--quick`` or not) and how to read its result file."""

    name: str
    limit_s: tuple[float, float]  # full, quick
    command: Callable[[argparse.Namespace, Path], list[str]]
    read: Callable[[Path], dict] = field(default=lambda result: json.loads(result.read_text()))


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCHMARKS / script), *args]


def data_option(args: argparse.Namespace) -> list[str]:
    return ["--data-dir", args.data_dir] if args.data_dir else []


def tests_command(args: argparse.Namespace, result: Path) -> list[str]:
    where = ["tests/test_model.py", "-k", "not svi_learns"] if args.quick else []
    options = ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", f"--junitxml={result}"]
    return [sys.executable, "-m", "pytest", *where, "-m", "device and not slow", "--device", args.device, *options]


def read_junit(result: Path) -> dict:
    """Counts and failed test ids of a pytest JUnit XML report."""
    suite = ET.parse(result).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    passed = counts["tests"] > 0 and counts["failures"] == counts["errors"] == 0
    bad = counts["failures"] + counts["errors"]
    summary = f"{counts['tests'] - bad - counts['skipped']} passed, {bad} failed, {counts['skipped']} skipped"
    return {
        "passed": passed,
        "summary": summary + (f": {', '.join(failed[:5])}" if failed else ""),
        **counts,
        "failed": failed,
    }


def step_time_command(args: argparse.Namespace, result: Path) -> list[str]:
    sizes = (
        ["--configs", "16:1", "16:2", "--hidden", "32", "--rounds", "2", "--steps", "2", "--no-inductor"]
        if args.quick
        else ["--configs", "128:1", "128:16", "1024:1", "1024:16", "--rounds", "10", "--steps", "10"]
    )
    return python(
        "step_time.py", "--device", args.device, "--threads", "1", *sizes, *data_option(args), "--json", str(result)
    )


def read_step_time(result: Path) -> dict:
    report = json.loads(result.read_text())
    shown = ("pyro-vae", "pyro-vae traced", "pyro-vae compiled", "torch compiled")
    rows = [
        f"b{t['batch']} K={t['particles']}: "
        + ", ".join(f"{n} {r:.2f}" for n, r in t["ratio_to"]["torch"].items() if n in shown)
        for t in report["tables"]
    ]
    return {"passed": True, "summary": "time / torch's: " + "; ".join(rows), **report}


def loglik_command(args: argparse.Namespace, result: Path) -> list[str]:
    sizes = (
        ["--test-images", "10", "--num-samples", "200", "--chunk-size", "100", "--batch-size", "10"]
        if args.quick
        else ["--test-images", "2000", "--num-samples", "5000"]
    )
    return python(
        "loglik_throughput.py",
        "--device",
        args.device,
        "--threads",
        "1",
        *sizes,
        *data_option(args),
        "--json",
        str(result),
    )


def read_loglik(result: Path) -> dict:
    r = json.loads(result.read_text())
    rate = f"{r['image_samples_per_s']:,.0f} image-samples/s"
    matmul = f"{r['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s"
    summary = f"{rate}, {r['fraction_of_matmul']:.2f} of the matmul rate ({matmul})"
    return {"passed": True, "summary": summary, **r}


def training_command(check: str) -> Callable[[argparse.Namespace, Path], list[str]]:
    def command(args: argparse.Namespace, result: Path) -> list[str]:
        quick = ["--quick"] if args.quick else []
        return python(
            "training_checks.py",
            check,
            "--device",
            args.device,
            "--work",
            str(result.parent / check),
            *quick,
            *data_option(args),
            "--json",
            str(result),
        )

    return command


# time limits (full, quick): full ones sized for one GPU within the 9 minutes; quick ones only stop
# a hang, with room for a CPU shared with other work (each part takes 5 to 30 s on an idle one)
PARTS = [
    Part("tests", (100, 240), tests_command, read_junit),
    Part("step_time", (170, 240), step_time_command, read_step_time),
    Part("loglik", (45, 150), loglik_command, read_loglik),
    Part("readme", (100, 200), training_command("readme")),
    Part("torchrun", (60, 300), training_command("torchrun")),
    Part("resume", (60, 300), training_command("resume")),
]


def child_env() -> dict[str, str]:
    """The environment of every part: this checkout's pyro_vae first, unbuffered output."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run_part(part: Part, args: argparse.Namespace, work: Path, limit_s: float, log) -> dict:
    """Run one part in its own process group, stopped at ``limit_s``; its verdict and figures."""
    result = work / (f"{part.name}.xml" if part.name == "tests" else f"{part.name}.json")
    cmd = part.command(args, result)
    output = work / f"{part.name}.out"
    start, cpu_before = time.perf_counter(), cpu_seconds()
    with open(output, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(), start_new_session=True
        )
        try:
            returncode, timed_out = proc.wait(timeout=limit_s), False
        except subprocess.TimeoutExpired:
            returncode, timed_out = stop(proc), True
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
    text = output.read_text(errors="replace")
    log.write(f"\n===== {part.name}: {' '.join(cmd)}\n{text}")
    verdict: dict = {"passed": False, "summary": ""}
    if result.exists():
        try:
            verdict = part.read(result)
        except (ValueError, KeyError, TypeError, ET.ParseError) as e:
            verdict = {"passed": False, "summary": f"unreadable result ({type(e).__name__}: {e})"}
    if timed_out:
        verdict.update(
            passed=False,
            summary=f"stopped at its {limit_s:.0f} s limit"
            + (f"; done by then: {verdict['summary']}" if verdict["summary"] else ""),
        )
    elif returncode != 0:
        last = (text.strip().splitlines() or [""])[-1][:300]
        verdict.update(passed=False, summary=verdict["summary"] or f"exit status {returncode}: {last}")
    return {
        **verdict,
        "seconds": seconds,
        "cpu_s": cpu,
        "limit_s": limit_s,
        "returncode": returncode,
        "timed_out": timed_out,
        "argv": cmd,
        "output_tail": text[-3000:],
    }


def cpu_seconds() -> float:
    """CPU time (user and system) of this process's ended descendants: the parts, their children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM to the part's process group, SIGKILL after a grace period; its exit status. (The
    group exists until the part's process is reaped, which only these waits do.)"""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def requirements() -> list[str]:
    """The package requirements of ``pyproject.toml``: its dependencies and its ``test`` extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"]]


def preflight(args: argparse.Namespace) -> dict:
    """What this machine has for the check, and what it lacks (``missing``, one entry each)."""
    from importlib import import_module, metadata

    missing, found = [], {"python": platform.python_version()}
    try:
        from packaging.requirements import Requirement

        wanted = [req for req in map(Requirement, requirements()) if req.name not in UNUSED]
    except ImportError as e:
        return {
            "missing": [f"{e.name or 'tomllib'} (to read pyproject.toml; Python 3.11 or newer and packaging)"],
            "found": found,
        }
    for req in wanted:
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req} (found {version})")
            continue
        try:
            import_module(MODULES.get(req.name, req.name))
            found[req.name] = version
        except Exception as e:  # noqa: BLE001 - any failure to import is what the line must name
            missing.append(f"{req.name} {version} (cannot be imported: {first_line(e)})")
    if missing:  # pyro_vae and the checks below need those packages
        return {"missing": missing, "found": found}
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed

    from pyro_vae.data import load_dataset
    from pyro_vae.errors import ConfigError, DataError
    from pyro_vae.runtime import resolve_device

    try:
        device = resolve_device(args.device)
        found["device"] = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
        )
        if device.type == "cuda":
            found["cuda"] = torch.version.cuda
            if not torch.distributed.is_nccl_available():
                missing.append("NCCL (this torch was built without it; the torchrun part needs it)")
    except ConfigError as e:
        missing.append(f"device {args.device} ({first_line(e)})")
    try:
        found["data"] = load_dataset("fashion_mnist", args.data_dir).source
    except DataError as e:
        missing.append(f"Fashion-MNIST ({first_line(e)})")
    return {"missing": missing, "found": found}


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:400]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md and gpu_check.log")
    p.add_argument("--quick", action="store_true", help="every part at toy sizes")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: the usual places)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all the parts together (default 530, under 9 minutes in all; 1200 with --quick)",
    )
    p.add_argument(
        "--parts",
        nargs="+",
        choices=[part.name for part in PARTS],
        default=[part.name for part in PARTS],
        help="run only these parts",
    )
    args = p.parse_args(argv)
    deadline = time.perf_counter() + (args.budget or (1200 if args.quick else 530))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": command,
        "device": args.device,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "preflight": preflight(args),
        "parts": {},
    }
    found, missing = report["preflight"]["found"], report["preflight"]["missing"]
    if missing:
        help_line = "README.md, 'GPU check', says how to install packages on a machine without internet"
        print(f"preflight: missing {'; '.join(missing)}. {help_line}.", flush=True)
    else:
        print(f"preflight: ok: {', '.join(f'{k} {v}' for k, v in found.items())}", flush=True)
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, open(args.out / "gpu_check.log", "w") as log:
            for part in (part for part in PARTS if part.name in args.parts):
                left = deadline - time.perf_counter() - GRACE_S
                if left < 5:
                    report["parts"][part.name] = {
                        "passed": False,
                        "summary": "not run: the budget was spent",
                        "seconds": 0.0,
                    }
                else:
                    report["parts"][part.name] = run_part(
                        part, args, Path(tmp), min(part.limit_s[1 if args.quick else 0], left), log
                    )
                r = report["parts"][part.name]
                print(
                    f"{part.name:<10} {'pass' if r['passed'] else 'FAIL'}  {r['seconds']:5.0f} s  {r['summary']}",
                    flush=True,
                )
    report["passed"] = not missing and all(r["passed"] for r in report["parts"].values())
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    if not missing:
        (args.out / "gpu_check.md").write_text(markdown(report))
    print(
        f"written: {args.out / 'gpu_check.json'}"
        + ("" if missing else f", {args.out / 'gpu_check.md'}, {args.out / 'gpu_check.log'}")
    )
    return 2 if missing else 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
