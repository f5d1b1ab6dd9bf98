"""The tables of a GPU check (``gpu_check.json``) in Markdown, as ``docs/benchmarks.md`` shows them.

python benchmarks/gpu_check_report.py gpu-check/gpu_check.json   # prints gpu_check.md again
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAN = float("nan")


def table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A Markdown table; ``align`` has one letter per column, ``l`` (left) or ``r`` (right)."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return [f"| {' | '.join(cells)} |" for cells in (header, rule, *rows)]


def comparison_text(c: dict) -> list[str]:
    """Two runs compared (``training_checks.compare_runs``): identical, or a table of what differs."""
    if c["identical"]:
        return [f"Bit for bit identical: all {c['tensors_compared']} checkpoint tensors and every metric."]
    rows = [[d["tensor"], f"{d.get('max_abs', NAN):.3g}", f"{d.get('relative', NAN):.3g}"] for d in c["differing"]]
    return [
        f"Not identical: {len(c['differing'])} of {c['tensors_compared']} tensors differ, each within "
        f"{c['tolerance']:.2g} of its largest entry; metrics differ by {c['metrics_relative_difference']} (relative).",
        "",
        *table(["tensor", "max abs difference", "relative to the tensor's largest entry"], rows, "lrr"),
    ]


def step_time(r: dict) -> list[str]:
    rows = []
    for t in r["tables"]:
        for name, ms in t["ms"].items():
            to_compiled = t["ratio_to"].get("torch compiled", {}).get(name)
            rows.append(
                [
                    str(t["batch"]),
                    str(t["particles"]),
                    name,
                    f"{ms:.3f}",
                    f"{t['ratio_to']['torch'][name]:.3f}",
                    "—" if to_compiled is None else f"{to_compiled:.3f}",
                    f"{t['compile_s'][name]:.1f}" if name in t["compile_s"] else "",
                ]
            )
    header = ["batch", "K", "candidate", "ms/step", "/ torch", "/ torch compiled", "first call s"]
    return [
        "## Training step against hand-written PyTorch",
        "",
        f"{r['machine']}; 784-{r['hidden']}-20 MLP; medians of {r['rounds']} interleaved rounds "
        f"of {r['steps']} steps.",
        "",
        *table(header, rows, "rrlrrrr"),
    ]


def loglik(r: dict) -> list[str]:
    header = ["images", "K", "image-samples/s", "decoder GFLOP/s", "float32 matmul GFLOP/s", "fraction"]
    row = [
        str(r["images"]),
        str(r["num_samples"]),
        f"{r['image_samples_per_s']:,.0f}",
        f"{r['decoder_flops_per_s'] / 1e9:,.1f}",
        f"{r['matmul_flops_per_s'] / 1e9:,.1f}",
        f"{r['fraction_of_matmul']:.3f}",
    ]
    return ["## Importance-sampled log p(x) throughput", "", *table(header, [row], "rrrrrr")]


def readme(r: dict) -> list[str]:
    header = ["epochs", "first epoch s (start-up included)", "median epoch s", "test ELBO"]
    row = [
        str(len(r["metrics"])),
        f"{r['first_epoch_s']:.1f}",
        f"{r['median_epoch_s'] or NAN:.2f}",
        f"{r['test_elbo']:.2f}",
    ]
    return ["## The README's training command", "", f"`{r['user_command']}`", "", *table(header, [row], "rrrr")]


def torchrun(r: dict) -> list[str]:
    rows = [
        [name, f"{r[name]['first_epoch_s']:.1f}", f"{r[name]['median_epoch_s'] or NAN:.2f}"]
        for name in ("single", "torchrun")
    ]
    return [
        f"## torchrun, one process ({r['backend']}), against one plain process",
        "",
        *table(["run", "first epoch s (start-up included)", "median epoch s"], rows, "lrr"),
        "",
        f"An epoch under torchrun takes {r['epoch_time_ratio'] or NAN:.2f}x the single process's time. The two runs:",
        "",
        *comparison_text(r["comparison"]),
    ]


def resume(r: dict) -> list[str]:
    return [
        "## Killed after its first checkpoint and resumed",
        "",
        f"Killed by SIGKILL after epoch {r['killed_after_epochs']} of {r['epochs']} and resumed; "
        "against the uninterrupted run:",
        "",
        *comparison_text(r["comparison"]),
    ]


# part -> its section, drawn when the part got as far as the figures the section needs
SECTIONS = {
    "step_time": (step_time, "tables"),
    "loglik": (loglik, "image_samples_per_s"),
    "readme": (readme, "metrics"),
    "torchrun": (torchrun, "comparison"),
    "resume": (resume, "comparison"),
}


def markdown(report: dict) -> str:
    """The verdicts and every part's tables."""
    found, parts = report["preflight"]["found"], report["parts"]
    versions = ", ".join(f"{k} {v}" for k, v in found.items() if k not in ("device", "data"))
    verdicts = [
        [name, "pass" if p["passed"] else "**FAIL**", f"{p['seconds']:.0f}", f"{p.get('cpu_s', 0):.0f}", p["summary"]]
        for name, p in parts.items()
    ]
    lines = [
        f"# GPU check on {found.get('device', report['device'])}",
        "",
        f"`{report['command']}`, {report['date']}; {versions}.",
        "",
        *table(["part", "verdict", "seconds", "CPU seconds", "result"], verdicts, "llrrl"),
    ]
    for name, (section, needs) in SECTIONS.items():
        if parts.get(name, {}).get(needs):
            lines += ["", *section(parts[name])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())), end="")
