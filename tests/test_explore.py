"""The patch-similarity explorer (`python -m evaluation.explore`): the page in a real browser (headless Chromium)
against NumPy cosine similarities of the features it embeds, the encoding against scikit-learn and the model's
own features, the PNG, and bad input as one line with nothing overwritten.

One page is built for the whole module (two random-init tiny ViTs, three 112 px images: one compilation, the
second model's program comes from the session's compilation cache) and opened with different fragments.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from eval_fixtures import make_example
from flax import nnx
from PIL import Image
from programs import run_program

import neco_jax
from bench import browser
from evaluation.explore import data
from evaluation.features import FeatureExtractor
from neco_jax.models import VisionTransformer, get_arch

ROOT = Path(__file__).resolve().parents[1]
SIZE, GRID, DIMS, TOP_K = 112, 8, 16, 4  # the tiny ViT's 64-dim features reduced to 16 axes
QUERY = (1, 3, 5)  # image, row, column
# The module's page is built once per process: keep its tests on one xdist worker (tests/run.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("explore_page")
needs_chromium = pytest.mark.skipif(
    browser.find_chromium() is None,
    reason="chromium is not installed (apt-get install -y chromium; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two saved random-init tiny ViTs and a folder of three images of different shapes."""
    root = tmp_path_factory.mktemp("explore_inputs")
    for seed in (0, 1):
        neco_jax.save_backbone(VisionTransformer(get_arch("vit_tiny_test"), rngs=nnx.Rngs(seed)), root / f"m{seed}")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(112, 112), (96, 140), (150, 100)]):
        Image.fromarray(make_example(rng, size, [3 * i + 1, 3 * i + 2])[0]).save(images / f"img{i}.png")
    return root


def explore(*args: str) -> int:
    """The exit status of `python -m evaluation.explore *args`, run in this process (tests/programs.py)."""
    return run_program("evaluation.explore", *args)


def _args(inputs, out, *extra):
    return [
        f"--checkpoint={inputs / 'm0'}",
        f"--checkpoint={inputs / 'm1'}",
        f"--images={inputs / 'images'}",
        f"--out={out}",
        f"--size={SIZE}",
        f"--dims={DIMS}",
        f"--top_k={TOP_K}",
        *extra,
    ]


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    """The page and PNG written by the command, and the data the page embeds, decoded here from the HTML."""
    out = tmp_path_factory.mktemp("explore_out") / "explore.html"
    assert explore(*_args(inputs, out, f"--png={QUERY[0]}:{QUERY[1]},{QUERY[2]}")) == 0
    text = out.read_text(encoding="utf-8")
    payload = json.loads(re.search(r'<script type="application/json" id="explore-data">(.*?)</script>', text, re.S)[1])
    return out, text, payload


def decoded_unit_vectors(model: dict) -> np.ndarray:
    """(N, P, dims) float64 unit vectors from the page's JSON: int8 codes times per-axis scales, normalised."""
    codes = np.frombuffer(base64.b64decode(model["codes"]), np.int8).reshape(-1, GRID * GRID, model["dims"])
    vectors = codes.astype(np.float32) * np.asarray(model["scales"], np.float32)
    return vectors.astype(np.float64) / np.linalg.norm(vectors.astype(np.float64), axis=-1, keepdims=True)


def reference(payload: dict, image: int, row: int, col: int) -> list[np.ndarray]:
    """Per model, (N, P) cosine similarity of every embedded patch to the query patch."""
    out = []
    for model in payload["models"]:
        unit = decoded_unit_vectors(model)
        out.append(unit.reshape(-1, unit.shape[-1]) @ unit[image, row * GRID + col])
    return [s.reshape(len(payload["images"]), -1) for s in out]


# ------------------------------------------------------------------------------------------------ encoding


def test_principal_axes_are_the_top_right_singular_vectors():
    """Uncentred PCA = the SVD of the data itself (NumPy's, not the eigendecomposition of X^T X used here)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(400, 24)) * np.linspace(3, 0.1, 24)) @ np.linalg.qr(rng.normal(size=(24, 24)))[0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    axes, retained = data.principal_axes(x.astype(np.float32), 6)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(np.abs(np.sum(axes * vt[:6], axis=1)), 1.0, atol=1e-5)
    assert retained == pytest.approx((singular[:6] ** 2).sum() / (singular**2).sum(), rel=1e-6)


def test_int8_codes_are_within_half_a_step_and_keep_cosines_at_full_width():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 4, 4, 32)).astype(np.float32) + 0.5
    model = data.encode_features("m", features, dims=32)
    unit = features.reshape(-1, 32) / np.linalg.norm(features.reshape(-1, 32), axis=1, keepdims=True)
    axes, _ = data.principal_axes(unit.astype(np.float32), 32)
    projected = unit @ axes.T.astype(np.float64)
    step = model.scales.astype(np.float64)
    assert np.all(np.abs(model.codes.reshape(-1, 32) * step - projected) <= step / 2 + 1e-6)
    assert np.abs(model.codes).max() == data.CODE_MAX
    decoded = model.unit_vectors().reshape(-1, 32)
    assert np.abs(decoded @ decoded.T - unit @ unit.T).max() < 0.02  # int8 alone: a rotation keeps the cosines


def test_stated_similarity_error_is_the_models_own(inputs, built):
    """The page states how far its cosines are from the full features'; with 192 patches every one is a query, so
    the statement must equal the error measured here from the full features (the feature extractor is checked
    against the model in tests/test_eval_e2e.py)."""
    _, _, payload = built
    names = sorted(p for p in (inputs / "images").iterdir())
    x = data.model_inputs([data.read_image(p.name, str(p)) for p in names], SIZE)
    for seed, model in enumerate(payload["models"]):
        extractor = FeatureExtractor(neco_jax.load_backbone(inputs / f"m{seed}"))
        full = extractor(x).astype(np.float64).reshape(-1, 64)
        full /= np.linalg.norm(full, axis=1, keepdims=True)
        unit = decoded_unit_vectors(model).reshape(-1, DIMS)
        diff = np.abs(full @ full.T - unit @ unit.T)
        assert model["similarity_error"]["mean"] == pytest.approx(diff.mean(), abs=1e-5)
        assert model["similarity_error"]["max"] == pytest.approx(diff.max(), abs=1e-5)
        assert 0 < model["retained"] < 1 and model["dims"] == DIMS and model["embed_dim"] == 64


def test_python_rules_match_numpy(built):
    """similarity_maps and nearest_patches (what the PNG draws) against the NumPy reference."""
    _, _, payload = built
    expected = reference(payload, *QUERY)
    for model, sims in zip(payload["models"], expected):
        unit = decoded_unit_vectors(model).astype(np.float32)
        maps = data.similarity_maps(unit, *QUERY, (GRID, GRID))
        np.testing.assert_allclose(maps.reshape(len(sims), -1), sims, atol=1e-5)
        query_patch = QUERY[1] * GRID + QUERY[2]
        for i, row in enumerate(sims):
            exclude = query_patch if i == QUERY[0] else None
            assert_nearest(data.nearest_patches(maps[i], TOP_K, exclude), row, exclude)


def assert_nearest(found, sims: np.ndarray, exclude: int | None, k: int = TOP_K) -> None:
    """`found` are the k most similar patches of `sims` other than `exclude` (ties of 1e-6 may swap)."""
    others = np.delete(sims, exclude) if exclude is not None else sims
    kth = np.sort(others)[::-1][k - 1]
    found = [int(p) for p in found]
    assert len(found) == len(set(found)) == k and exclude not in found
    assert all(sims[p] >= kth - 1e-6 for p in found), (found, kth)


# ------------------------------------------------------------------------------------------------ the files


def test_page_is_self_contained(built):
    _, text, payload = built
    assert not re.search(r"<(link|iframe|object|embed)\b", text, re.I)
    assert not re.search(r"<script[^>]*\bsrc=", text, re.I)
    assert not re.search(r"@import|url\(|https?://|//[a-z]", text.split('id="explore-data"')[0], re.I)
    assert all(i["src"].startswith("data:image/jpeg;base64,") for i in payload["images"])
    assert [i["name"] for i in payload["images"]] == ["img0.png", "img1.png", "img2.png"]
    assert [(i["width"], i["height"]) for i in payload["images"]] == [(112, 112), (112, 77), (75, 112)]  # aspect kept


def _panels(figure_or_card):
    """Every image panel of a drawn figure, as (card title, axes), walking its nested subfigures."""
    found = []
    for sub in figure_or_card.subfigs:
        if sub.axes and sub.get_visible() and sub._suptitle is not None:
            found += [(sub._suptitle.get_text(), ax) for ax in sub.axes]
        found += _panels(sub)
    return found


@pytest.mark.parametrize("view", ["sim", "pca"])
def test_png_marks_the_query_and_the_nearest_patches(view):
    """The figure's cyan squares are NumPy's nearest patches of the embedded features; the white one is the query."""
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    from evaluation.explore import figure

    def edged(marks, color):
        return [r for r in marks if np.allclose(r.get_edgecolor(), to_rgba(color))]

    rng = np.random.default_rng(3)
    images = [data.ExploreImage(f"im{i}", rng.integers(0, 255, (60 + 20 * i, 70, 3), np.uint8)) for i in range(3)]
    models = [data.encode_features(f"m{m}", rng.normal(size=(3, 4, 4, 12)).astype(np.float32) + 1, 8) for m in (0, 1)]
    explorer = data.Explorer(images, models, size=56, patch_size=14, top_k=3)
    panels = _panels(figure.draw(explorer, 2, 1, 3, view=view))
    assert sorted(title for title, _ in panels) == sorted(f"{i}: im{i}" for i in range(3) for _ in models)
    for title, ax in panels:
        i, m = int(title.split(":")[0]), "AB".index(ax.get_title(loc="left"))
        unit = models[m].unit_vectors().astype(np.float64)
        sims = unit[i] @ unit[2, 1 * 4 + 3]
        marks = [r for r in ax.patches if isinstance(r, Rectangle)]
        nearest = [int(r.get_y()) * 4 + int(r.get_x()) for r in edged(marks, figure.NEAREST_COLOR)]
        exclude = 1 * 4 + 3 if i == 2 else None
        assert_nearest(nearest, sims, exclude, k=3)
        queries = {(int(r.get_y()), int(r.get_x())) for r in edged(marks, figure.QUERY_COLOR)}
        assert queries == ({(1, 3)} if i == 2 else set())


def test_png_is_written(built):
    out, _, _ = built
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 300


def test_static_files_are_package_data():
    """pyproject installs every file the page inlines (a wheel without them could not write a page)."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    static = ROOT / "evaluation" / "explore" / "static"
    for path in static.iterdir():
        assert any(path.match(str(ROOT / "evaluation" / "explore" / g)) for g in globs["evaluation.explore"]), path


# ------------------------------------------------------------------------------------------------ the browser


@needs_chromium
def test_page_similarities_and_nearest_patches_equal_numpy(built, record_property):
    out, _, payload = built
    image, row, col = QUERY
    dom = browser.elements_by_id(browser.dump_dom(out, f"image={image}&patch={row},{col}&dump=1"))
    assert dom["status"]["attrs"]["data-query"] == f"{image},{row},{col}"  # the fragment selected the patch
    dumped = json.loads(dom["dump"]["text"])
    expected = reference(payload, *QUERY)
    for m, sims in enumerate(expected):
        page_sims = np.asarray(dumped["models"][str(m)]).reshape(sims.shape)
        np.testing.assert_allclose(page_sims, sims, atol=1e-3)
        assert np.abs(page_sims - sims).max() < 1e-5  # what the tolerance leaves: float32 rounding
        for i in range(len(sims)):
            exclude = row * GRID + col if i == image else None
            marked = [tuple(map(int, rc.split(","))) for rc in dom[f"cell-{m}-{i}"]["attrs"]["data-nearest"].split()]
            assert_nearest([r * GRID + c for r, c in marked], sims[i], exclude)
    assert dumped["lo"] == pytest.approx(min(s.min() for s in expected), abs=1e-5)
    ms = float(dom["status"]["attrs"]["data-update-ms"])
    record_property("measured: explorer page, one similarity update in headless Chromium (ms)", ms)


@needs_chromium
def test_fragment_selects_view_and_models(built):
    out, _, _ = built
    dom = browser.dump_dom(out, "patch=0,7&models=1&view=pca&image=2")
    found = browser.elements_by_id(dom)
    assert found["status"]["attrs"]["data-query"] == "2,0,7"
    assert found["status"]["attrs"]["data-fragment"] == "#image=2&patch=0,7&view=pca&models=1"  # written back whole
    assert re.search(r'<body[^>]*data-view="pca"', dom)
    assert all("hidden" in found[f"cell-0-{i}"]["attrs"] for i in range(3))
    assert not any("hidden" in found[f"cell-1-{i}"]["attrs"] for i in range(3))


# Events a person would cause, dispatched one at a time after the page has loaded; the page's state (query and
# address fragment) is recorded before each into <body data-log>. Patches are given as (row, column) of the 8x8 grid.
INTERACTION = """<script>
window.addEventListener("load", () => {
  const status = document.getElementById("status"), log = [];
  const mouse = (type, cellId, row, col) => {
    const cell = document.getElementById(cellId), box = cell.getBoundingClientRect();
    const x = box.left + ((col + 0.5) / 8) * box.width, y = box.top + ((row + 0.5) / 8) * box.height;
    cell.dispatchEvent(new MouseEvent(type, { bubbles: true, clientX: x, clientY: y }));
  };
  const key = (name) => document.dispatchEvent(new KeyboardEvent("keydown", { key: name, bubbles: true }));
  const steps = [
    () => mouse("mousemove", "cell-1-2", 4, 6),
    () => mouse("click", "cell-1-2", 4, 6),
    () => mouse("mousemove", "cell-0-0", 1, 1),
    () => { key("ArrowRight"); key("ArrowRight"); key("ArrowDown"); },
    () => { key("ArrowUp"); key("ArrowUp"); key("ArrowUp"); key("ArrowUp"); key("ArrowUp"); },
    () => key("v"),
    () => key("Escape"),
    () => mouse("mousemove", "cell-0-0", 1, 1),
  ];
  const next = (i) => setTimeout(() => {
    log.push(`${status.dataset.query}${status.textContent.includes("pinned") ? " pinned" : ""} ${status.dataset.fragment}`);
    if (i < steps.length) { steps[i](); next(i + 1); } else document.body.dataset.log = log.join("|");
  }, 50);
  next(0);
});
</script>
"""


@needs_chromium
def test_hover_click_and_keys_move_the_query(built, tmp_path):
    out, text, _ = built
    page = tmp_path / "interaction.html"
    page.write_text(text.replace("</body>", INTERACTION + "</body>"), encoding="utf-8")
    dom = browser.run_page(page, "", "--dump-dom", "--virtual-time-budget=10000")[0]
    log = re.search(r'<body[^>]*data-log="([^"]*)"', dom)[1].replace("&amp;", "&").split("|")
    view = "&view=sim&models=0,1"
    assert log == [
        f"0,4,4 #image=0&patch=4,4{view}",  # opened without a fragment: the middle patch of the first image
        f"2,4,6 #image=2&patch=4,6{view}",  # hovering makes the patch under the pointer the query
        f"2,4,6 pinned #image=2&patch=4,6{view}",  # a click pins it
        f"2,4,6 pinned #image=2&patch=4,6{view}",  # ... so hovering elsewhere does not move it
        f"2,5,7 pinned #image=2&patch=5,7{view}",  # arrow keys move it, and stop at the grid's edge
        f"2,0,7 pinned #image=2&patch=0,7{view}",
        "2,0,7 pinned #image=2&patch=0,7&view=pca&models=0,1",  # v switches the view
        "2,0,7 #image=2&patch=0,7&view=pca&models=0,1",  # Esc releases the query
        "0,1,1 #image=0&patch=1,1&view=pca&models=0,1",  # ... and hovering moves it again
    ]


@needs_chromium
def test_switching_models_and_view_changes_the_screenshot(built, tmp_path):
    out, _, _ = built
    base = f"image={QUERY[0]}&patch={QUERY[1]},{QUERY[2]}"
    shots = {}
    for name, fragment in (("A", "&models=0"), ("B", "&models=1"), ("A pca", "&models=0&view=pca")):
        path = browser.screenshot(out, tmp_path / f"{name}.png", base + fragment, size=(900, 700))
        shots[name] = np.asarray(Image.open(path).convert("RGB"), np.int16)
    for a, b in (("A", "B"), ("A", "A pca")):
        changed = np.abs(shots[a] - shots[b]).max(axis=-1) > 16
        assert changed.mean() > 0.01, (a, b, changed.mean())


# ------------------------------------------------------------------------------------------------ bad input


def _expect_one_line(capsys, rc, *words):
    err = capsys.readouterr().err
    last = err.strip().split("\n")[-1]
    assert rc == 2 and last.startswith("error: ") and "Traceback" not in err, err
    assert all(w in last for w in words), last


def test_no_images(inputs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "e.html"
    _expect_one_line(capsys, explore(*_args(inputs, out)[:2], *[f"--images={tmp_path / 'empty'}", f"--out={out}"]))
    assert not out.exists()


def test_unreadable_image(inputs, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (30, 30)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "e.html"
    rc = explore(*[a if not a.startswith("--images") else f"--images={folder}" for a in _args(inputs, out)])
    _expect_one_line(capsys, rc, "b.jpg", "not a readable image")
    assert not out.exists()


@pytest.mark.parametrize("bad", ["missing_folder/", "garbage.safetensors", "empty_folder"])
def test_checkpoint_that_does_not_load(inputs, tmp_path, capsys, bad):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (tmp_path / "empty_folder").mkdir()
    out = tmp_path / "e.html"
    args = [
        a if not a.startswith(f"--checkpoint={inputs / 'm1'}") else f"--checkpoint={tmp_path / bad}"
        for a in _args(inputs, out)
    ]
    _expect_one_line(capsys, explore(*args), bad.rstrip("/"))
    assert not out.exists()


def test_checkpoints_with_different_patch_sizes(inputs, tmp_path, capsys):
    import dataclasses

    config = dataclasses.replace(get_arch("vit_tiny_test"), patch_size=16)
    neco_jax.save_backbone(VisionTransformer(config, rngs=nnx.Rngs(0)), tmp_path / "p16")
    args = [a.replace(str(inputs / "m1"), str(tmp_path / "p16")) for a in _args(inputs, tmp_path / "e.html")]
    _expect_one_line(capsys, explore(*args), "patch sizes [14, 16]")
    assert [p.name for p in tmp_path.iterdir()] == ["p16"]


@pytest.mark.parametrize("existing", ["explore.html", "explore.png"])
def test_existing_outputs_are_not_overwritten(inputs, tmp_path, capsys, existing):
    (tmp_path / existing).write_text("keep me")
    rc = explore(*_args(inputs, tmp_path / "explore.html", "--png=0:1,1"))
    _expect_one_line(capsys, rc, existing, "already exists")
    assert (tmp_path / existing).read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == [existing]


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--png=0:1"], ["--png=0:1", "IMAGE:ROW,COL"]),
        (["--png=nosuch.png:1,1"], ["nosuch.png", "names no image"]),
        (["--png=0:8,0"], ["8,0", "8x8"]),
        (["--size=100"], ["--size=100", "patch size 14"]),
        (["--dims=0"], ["--dims"]),
        (["--no_such_flag=1"], ["no_such_flag"]),
    ],
)
def test_bad_settings(inputs, tmp_path, capsys, extra, words):
    _expect_one_line(capsys, explore(*_args(inputs, tmp_path / "e.html", *extra)), *words)
    assert list(tmp_path.iterdir()) == []


def test_process_exits_2_with_one_line(inputs, tmp_path):
    (tmp_path / "e.html").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.explore", *_args(inputs, tmp_path / "e.html")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and (tmp_path / "e.html").read_text() == "keep me"
