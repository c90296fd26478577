"""One command for a checkpoint's whole table: every protocol whose data exists, side by side with the paper.

    python -m evaluation.suite --checkpoint=CKPT --data_dir=DATA --workdir=OUT \
        [--protocols=linear,overcluster,hummingbird,cbfe] [--set=image_size=448 --set=linear.epochs=25 ...]

Runs each job config ``configs/eval/<dataset>_<protocol>.py`` of the chosen protocols whose dataset is found
in DATA or one of its sub-folders (the layouts of ``evaluation/datasets.py``), each in OUT/<dataset>_<protocol>
through the same runner as ``python -m evaluation``. ``--set`` overrides a config field in every job that has
it. Writes OUT/results.json (one entry per protocol and dataset, mIoU as a fraction, and the jobs skipped or
failed with the reason), OUT/table.md (our numbers beside the NeCo README's for the matching backbone, see
``evaluation.published``) and OUT/results.png (the same as a bar chart). A failing job is recorded and the
others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

from evaluation import features, published
from evaluation.datasets import DATASET_NAMES
from evaluation.job_inputs import open_split
from evaluation.plots import save_bar_chart
from evaluation.protocols import NAMES as PROTOCOLS
from evaluation.runner import run_job
from input_pipeline.sources import find_voc_folder
from neco_jax.errors import ConfigError, DatasetError, UserError, cli, print_error
from neco_jax.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def _has(root: Path, *parts: str) -> bool:
    return all((root / p).is_dir() for p in parts)


# dataset -> the folders that mark its data_dir (evaluation/datasets.py layouts).
_MARKERS = {
    "voc": lambda r: find_voc_folder(r) is not None,
    "coco_things": lambda r: _has(r, "images/val2017", "annotations/val2017"),
    "coco_stuff": lambda r: _has(r, "images/val2017", "annotations/stuff_annotations"),
    "ade20k": lambda r: _has(r, "ADEChallengeData2016") or _has(r, "images/validation", "annotations/validation"),
    "cityscapes": lambda r: _has(r, "leftImg8bit", "gtFine"),
}


def find_data_dir(dataset: str, root: Path) -> Path | None:
    """The folder holding `dataset` in its reader's layout: `root` itself or one of its sub-folders."""
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    return next((c for c in candidates if _MARKERS[dataset](c)), None)


def job_configs(protocols: list[str]) -> list[tuple[str, str]]:
    """(protocol, dataset) of every job config file for the chosen protocols, in table order."""
    return [(p, d) for p in protocols for d in DATASET_NAMES if (REPO / "configs" / "eval" / f"{d}_{p}.py").is_file()]


def load_config(protocol: str, dataset: str):
    return load_config_file(REPO / "configs" / "eval" / f"{dataset}_{protocol}.py")


def load_config_file(path: str | os.PathLike):
    """The locked job config of an evaluation config file (a path, or one relative to the repository)."""
    path = Path(path)
    if not path.is_file() and (REPO / path).is_file():
        path = REPO / path
    if not path.is_file():
        raise ConfigError(f"evaluation config {path} does not exist; use one of configs/eval/*.py")
    spec = importlib.util.spec_from_file_location(f"_eval_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_job_data(config) -> None:
    """Open the splits the job's protocol reads (overclustering: val only); a DatasetError names what is missing."""
    for split in [config.val_split] + ([] if config.protocol == "overcluster" else [config.train_split]):
        open_split(config, split)


def parse_overrides(pairs: list[str]) -> dict:
    """`field.sub=value` strings -> {field.sub: value}; values are Python literals where they parse, else text."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is not FIELD=VALUE; e.g. --set=linear.epochs=5")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def _has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def job_config(protocol, dataset, *, checkpoint, data_dir, workdir, overrides):
    config = load_config(protocol, dataset)
    values = {k: v for k, v in overrides.items() if _has_field(config, k)}
    values.update(checkpoint=checkpoint, data_dir=str(data_dir), workdir=str(workdir))
    try:
        config.update_from_flattened_dict(values)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"cannot apply --set to {dataset}_{protocol}: {' '.join(str(e).split())}") from e
    return config


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


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.suite", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="anything --config.checkpoint accepts")
    parser.add_argument("--data_dir", required=True, help="folder holding the datasets (or one dataset)")
    parser.add_argument("--workdir", required=True, help="output folder")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset of the protocols")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override, repeatable")
    parser.add_argument("--paper_row", default="", help="NeCo README row to compare with (default: guessed)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    summary = run_suite(
        args.checkpoint,
        args.data_dir,
        args.workdir,
        [p for p in args.protocols.split(",") if p],
        parse_overrides(args.set),
        args.paper_row,
    )
    if not summary["results"]:
        return print_error(f"no protocol ran; see {Path(args.workdir) / 'results.json'} for the reasons")
    return 1 if any(j["status"] == "error" for j in summary["jobs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
