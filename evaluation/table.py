"""A checkpoint's whole table: every protocol whose data exists under a root, side by side with the paper.

`run_suite` runs each job config (`evaluation.jobs`) of the chosen protocols whose dataset it finds, each in
OUT/<dataset>_<protocol> through the same runner as `python -m evaluation`, and writes OUT/results.json (one entry
per protocol and dataset, mIoU as a fraction, and the jobs skipped or failed with the reason), OUT/table.md (our
numbers beside the NeCo README's for the matching backbone, see `evaluation.published`) and OUT/results.png (the
same as a bar chart). A failing job is recorded and the others still run. The command line is
`python -m evaluation.suite` (evaluation/suite.py).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from evaluation import features, published
from evaluation.jobs import check_job_data, find_data_dir, job_config, job_configs
from evaluation.plots import save_bar_chart
from evaluation.protocols import NAMES as PROTOCOLS
from evaluation.runner import run_job
from neco_jax.errors import ConfigError, DatasetError, UserError
from neco_jax.files import atomic_write_text


def entries_of(protocol: str, dataset: str, results: dict) -> list[tuple[str, str, float]]:
    """(metric key, label, mIoU) rows of one job's results for the table: each K of overclustering,
    CBFE alone and CBFE + CD, the headline mIoU otherwise."""
    if protocol == "overcluster":
        return [(f"miou_k{r['k']}", f"overclustering K={r['k']}", r["miou"]) for r in results["runs"]]
    if protocol == "cbfe":
        rows = [("miou", "CBFE + CD", results["miou"])]
        if "miou_cbfe" in results:
            rows.insert(0, ("miou_cbfe", "CBFE only", results["miou_cbfe"]))
        return rows
    if protocol == "hummingbird":
        return [("miou", f"dense NN retrieval {results.get('fraction', '1/1')}", results["miou"])]
    return [("miou", protocol, results["miou"])]


def _paper(row, protocol, dataset, metric, results) -> float | None:
    if protocol == "hummingbird" and results.get("fraction", "1/1") != "1/1":
        return None  # the README's retrieval number uses the whole train set
    return published.paper_value(row, protocol, dataset, metric) if row else None


def write_table(path: Path, entries: list[dict], jobs: list[dict], header: dict) -> None:
    row = header["paper_row"]
    paper_name = " ".join(published.NECO_README[row][:2]) if row in published.NECO_README else "none"
    lines = [
        f"# {header['checkpoint']}",
        "",
        f"Paper row: {paper_name} ({header['paper_row_reason']}). Source: {published.SOURCE}.",
        "",
        "| protocol | dataset | mIoU % | paper % | difference |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        paper = e["paper"]
        shown = (f"{100 * paper:.1f}", f"{100 * (e['miou'] - paper):+.1f}") if paper is not None else ("", "")
        lines.append(f"| {e['label']} | {e['dataset']} | {100 * e['miou']:.1f} | {shown[0]} | {shown[1]} |")
    skipped = [j for j in jobs if j["status"] != "ok"]
    if skipped:
        lines += ["", "Not run:", ""]
        lines += [f"- {j['dataset']} {j['protocol']}: {j['status']} ({j['reason']})" for j in skipped]
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_suite(
    checkpoint: str, data_root: str, workdir: str, protocols: list[str], overrides: dict, paper_row: str = ""
) -> dict:
    """Run the jobs, write OUT/results.json, OUT/table.md and OUT/results.png; returns the results dict."""
    root = Path(data_root)
    if not root.is_dir():
        raise DatasetError(f"data_dir {root} does not exist; pass --data_dir=<folder holding the datasets>")
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise ConfigError(f"--protocols={','.join(protocols)}: use a comma-separated subset of {','.join(PROTOCOLS)}")
    if paper_row and paper_row not in published.NECO_README:
        raise ConfigError(f"--paper_row={paper_row}: use one of {', '.join(published.NECO_README)}")
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    which = overrides.get("checkpoint_model", "teacher")
    model = features.load_model(checkpoint, arch=overrides.get("arch"), which=which)
    cfg = model.config
    if paper_row:
        reason = "chosen with --paper_row"
    else:
        paper_row, reason = published.row_for(
            checkpoint, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, registers=cfg.num_register_tokens
        )
    del model
    entries, jobs = [], []
    for protocol, dataset in job_configs(protocols):
        job = {"protocol": protocol, "dataset": dataset}
        jobs.append(job)
        data_dir = find_data_dir(dataset, root)
        if data_dir is None:
            job.update(status="skipped", reason=f"no {dataset} folder under {root}")
            continue
        job_dir = out / f"{dataset}_{protocol}"
        config = job_config(
            protocol, dataset, checkpoint=checkpoint, data_dir=data_dir, workdir=job_dir, overrides=overrides
        )
        try:
            check_job_data(config)
        except UserError as e:
            job.update(status="skipped", reason=str(e))
            continue
        start = time.time()
        print(f"== {dataset} {protocol} -> {job_dir}", flush=True)
        try:
            results = run_job(config)
        except UserError as e:
            job.update(status="error", reason=str(e))
            continue
        except Exception as e:  # a bug in one protocol must not lose the others' results
            traceback.print_exc()
            job.update(status="error", reason=f"{type(e).__name__}: {e}")
            continue
        job.update(status="ok", seconds=round(time.time() - start, 1), workdir=str(job_dir))
        for metric, label, value in entries_of(protocol, dataset, results):
            entries.append(
                {
                    "protocol": protocol,
                    "dataset": dataset,
                    "metric": metric,
                    "label": label,
                    "miou": float(value),
                    "paper": _paper(paper_row, protocol, dataset, metric, results),
                }
            )
    header = {
        "checkpoint": checkpoint,
        "data_dir": str(root),
        "paper_row": paper_row,
        "paper_row_reason": reason,
        "paper_source": published.SOURCE,
    }
    summary = {**header, "results": entries, "jobs": jobs}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    write_table(out / "table.md", entries, jobs, header)
    if entries:
        labels = [f"{e['dataset']}\n{e['label']}" for e in entries]
        series = {"this checkpoint": [100 * e["miou"] for e in entries]}
        if any(e["paper"] is not None for e in entries):
            series["paper"] = [None if e["paper"] is None else 100 * e["paper"] for e in entries]
        save_bar_chart(labels, series, out / "results.png", f"{checkpoint}: mIoU %")
    print((out / "table.md").read_text(), end="")
    return summary
