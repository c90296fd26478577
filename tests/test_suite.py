"""`python -m evaluation.suite`: every protocol on a generated VOC-layout tree with a random checkpoint, the
published table as data, and the data discovery."""

import json

import eval_fixtures
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from programs import run_program

from evaluation import jobs, published

SMALL = [
    "image_size=56",
    "mask_size=28",
    "batch_size=4",
    "num_threads=2",
    "num_visualize=0",
    "linear.epochs=1",
    "linear.batch_size=4",
    "linear.train_mask_size=28",
    "linear.eval_mask_size=56",
    "overcluster.ks=(21, 40)",
    "overcluster.seeds=(0,)",
    "overcluster.iters=5",
    "overcluster.restarts=1",
    "overcluster.pca_dim=16",
    "hummingbird.memory_size=0",
    "hummingbird.passes=1",
    "hummingbird.memory_chunk=256",
    "cbfe.pca_dim=8",
    "cbfe.k_fg=24",
    "cbfe.kmeans_iters=5",
    "cbfe.kmeans_restarts=1",
    "cbfe.num_runs=2",
    "cbfe.evaluate_cbfe=False",
    "cbfe.k_community=8",
    "cbfe.markov_time=1.0",
    "cbfe.weight_threshold=0.02",
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from neco_jax import save_backbone
    from neco_jax.models import VisionTransformer, get_arch

    folder = tmp_path_factory.mktemp("ckpt") / "vit_tiny"
    save_backbone(VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(0)), folder)
    return folder


@pytest.mark.slow
def test_suite_runs_every_protocol_on_a_voc_tree(tmp_path, tiny_checkpoint):
    data = tmp_path / "data"
    eval_fixtures.make_voc_dataset(data / "voc", num_train=8, num_val=6)
    out = tmp_path / "out"
    argv = [f"--checkpoint={tiny_checkpoint}", f"--data_dir={data}", f"--workdir={out}"]
    rc = run_program("evaluation.suite", *argv, *[f"--set={s}" for s in SMALL], "--paper_row=neco_dinov2r_xr_vits14")
    assert rc == 0
    saved = json.loads((out / "results.json").read_text())
    ran = {(j["protocol"], j["dataset"]) for j in saved["jobs"] if j["status"] == "ok"}
    assert ran == {("linear", "voc"), ("overcluster", "voc"), ("hummingbird", "voc"), ("cbfe", "voc")}
    skipped = [j for j in saved["jobs"] if j["status"] == "skipped"]
    assert skipped and all("no " in j["reason"] for j in skipped)  # COCO, ADE20k, Cityscapes are absent
    by_label = {e["label"]: e for e in saved["results"]}
    assert set(by_label) == {
        "linear",
        "overclustering K=21",
        "overclustering K=40",
        "dense NN retrieval 1/1",
        "CBFE + CD",
    }
    for e in saved["results"]:
        assert 0.0 <= e["miou"] <= 1.0
        job = json.loads((out / f"{e['dataset']}_{e['protocol']}" / "results.json").read_text())
        assert e["miou"] == pytest.approx(job.get(e["metric"], job["miou"]))  # the job's own number, as a fraction
    assert by_label["linear"]["paper"] == pytest.approx(0.813)  # NeCo README, DINOv2R-XR ViT-S/14
    assert by_label["dense NN retrieval 1/1"]["paper"] == pytest.approx(0.802)
    assert by_label["overclustering K=40"]["paper"] is None  # the README has K=500 only
    table = (out / "table.md").read_text()
    assert "| linear | voc |" in table and "| 81.3 |" in table and "DINOv2R-XR ViT-S/14" in table
    assert f"{100 * by_label['linear']['miou']:.1f}" in table
    with Image.open(out / "results.png") as im:
        assert im.size[0] >= 480 and len(np.unique(np.asarray(im.convert("L")))) > 3


def test_paper_row_from_names_and_architecture():
    assert published.row_for("neco_dinov2r_vitb14_teacher", patch_size=14, embed_dim=768, registers=4)[0] == (
        "neco_dinov2r_vitb14"
    )
    assert published.row_for("/x/my_run", patch_size=14, embed_dim=384, registers=4)[0] == "neco_dinov2r_vits14"
    row, why = published.row_for("/x/my_run", patch_size=14, embed_dim=384, registers=0)
    assert row == "neco_dinov2_vits14" and "--paper_row" in why
    assert published.row_for("x.pth", patch_size=16, embed_dim=384, registers=0)[0] == "neco_dino_vits16"
    assert published.row_for("x.pth", patch_size=8, embed_dim=768, registers=0)[0] is None
    assert published.paper_value("neco_leopart_vits16", "overcluster", "voc", "miou_k500") == pytest.approx(0.553)
    assert published.paper_value("neco_leopart_vits16", "linear", "ade20k", "miou") is None
    # Every row has the three README columns, and every released NeCo checkpoint name has a row.
    from neco_jax.pretrained import PRETRAINED

    released = {n for n in PRETRAINED if n.startswith("neco_") and not n.endswith("_teacher")}
    assert released == set(published.NECO_README)
    assert all(set(v[2]) == set(published.COLUMNS) for v in published.NECO_README.values())


def test_data_discovery_and_user_errors(tmp_path, tiny_checkpoint, capsys):
    eval_fixtures.make_voc_dataset(tmp_path / "VOC", num_train=2, num_val=1)
    (tmp_path / "ade" / "ADEChallengeData2016").mkdir(parents=True)
    assert jobs.find_data_dir("voc", tmp_path) == tmp_path / "VOC"
    assert jobs.find_data_dir("ade20k", tmp_path) == tmp_path / "ade"
    assert jobs.find_data_dir("cityscapes", tmp_path) is None
    assert jobs.find_data_dir("voc", tmp_path / "VOC") == tmp_path / "VOC"
    inner = tmp_path / "VOC" / "VOCSegmentation"  # the VOCSegmentation folder itself is a VOC data_dir too
    assert jobs.find_data_dir("voc", inner) == inner
    assert jobs.parse_overrides(["a.b=(1, 2)", "c=text", "d=0.5"]) == {"a.b": (1, 2), "c": "text", "d": 0.5}
    for extra, message in [
        ([f"--data_dir={tmp_path / 'none'}"], "does not exist"),
        (["--protocols=linear,knn"], "--protocols=linear,knn"),
        (["--set=noequals"], "FIELD=VALUE"),
        (["--paper_row=resnet50"], "--paper_row=resnet50"),
    ]:
        argv = [f"--checkpoint={tiny_checkpoint}", f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'o'}"]
        assert run_program("evaluation.suite", *argv, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
