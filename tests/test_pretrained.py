"""Known pretrained names: the table against the upstream READMEs, and the download cache with local URLs.

No network: downloads use file:// URLs, and the offline case points at a port that refuses at once.
"""

from __future__ import annotations

import http.server
import threading

import numpy as np
import pytest
import torch
from programs import run_program

import neco_jax
from neco_jax import errors, pretrained
from neco_jax.errors import UserError
from neco_jax.models import ARCHS, get_arch

HF = "https://huggingface.co/FunAILab/NeCo/resolve/main"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_neco_release_has_student_and_teacher():
    # The rows of the NeCo README's table (the ViT-B DINOv2R row links vit-base files).
    rows = {
        "neco_dinov2_vits14": "vit-small/dinov2-architectures/neco_on_dinov2_vit14",
        "neco_dinov2r_xr_vits14": "vit-small/dinov2-architectures/neco_on_dinov2r_xr_vit14",
        "neco_dinov2r_vits14": "vit-small/dinov2-architectures/neco_on_dinov2r_vit14",
        "neco_dinov2_vitb14": "vit-base/dinov2-architectures/neco_on_dinov2_vit14",
        "neco_dinov2r_xr_vitb14": "vit-base/dinov2-architectures/neco_on_dinov2r_xr_vit14",
        "neco_dinov2r_vitb14": "vit-base/dinov2-architectures/neco_on_dinov2r_vit14",
        "neco_dino_vits16": "vit-small/dino-architectures/neco_on_dino_vit16",
        "neco_timetuning_vits16": "vit-small/dino-architectures/neco_on_timetuning_vit16",
        "neco_leopart_vits16": "vit-small/dino-architectures/neco_on_leopart_vit16",
    }
    neco = {n for n in pretrained.PRETRAINED if n.startswith("neco_")}
    assert neco == set(rows) | {f"{n}_teacher" for n in rows}
    for name, stem in rows.items():
        assert pretrained.PRETRAINED[name].url == f"{HF}/{stem}_model.ckpt"
        assert pretrained.PRETRAINED[f"{name}_teacher"].url == f"{HF}/{stem}_teacher.ckpt"


def test_hub_urls_follow_the_upstream_naming():
    table = pretrained.PRETRAINED
    assert table["dinov2_vits14"].url == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    )
    assert table["dinov2_vitg14_reg"].url == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    )
    assert table["dino_vitb8"].url == (
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    )
    expected = {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")} | {
        f"dino_vit{s}{p}" for s in "sb" for p in (16, 8)
    }
    assert {n for n in table if not n.startswith("neco_")} == expected


def test_architectures_and_interpolation_rules():
    table = pretrained.PRETRAINED
    for name, entry in table.items():
        config = get_arch(entry.arch, **entry.overrides)
        assert entry.arch in ARCHS, name
        size = {"s": 384, "b": 768, "l": 1024, "g": 1536}[name.split("_vit")[1][0]]
        assert config.embed_dim == size, name
        assert config.num_register_tokens == (4 if "_reg" in name or "dinov2r_vit" in name else 0), name
    # The hub's register models resample the table with antialias and no offset; NeCo never does.
    hub_reg = get_arch(table["dinov2_vits14_reg"].arch, **table["dinov2_vits14_reg"].overrides)
    assert (hub_reg.interpolate_offset, hub_reg.interpolate_antialias) == (0.0, True)
    neco_reg = get_arch(table["neco_dinov2r_vits14"].arch, **table["neco_dinov2r_vits14"].overrides)
    assert (neco_reg.interpolate_offset, neco_reg.interpolate_antialias) == (0.1, False)
    assert get_arch(table["dino_vits8"].arch).patch_size == 8


@pytest.fixture
def tiny_release(tmp_path, monkeypatch):
    """A known name whose 'official URL' is a local file (a 1-block ViT-S/14 in the DINOv2 layout)."""
    from dinov2.models.vision_transformer import DinoVisionTransformer

    vit = DinoVisionTransformer(
        img_size=56, patch_size=14, embed_dim=384, depth=1, num_heads=6, init_values=1.0, block_chunks=0
    )
    source = tmp_path / "upstream" / "tiny_pretrain.pth"
    source.parent.mkdir()
    torch.save(vit.state_dict(), source)
    entry = pretrained.Pretrained(source.as_uri(), "vit_small_patch14_dinov2", {"pos_grid": 4, "depth": 1})
    monkeypatch.setitem(pretrained.PRETRAINED, "tiny_release", entry)
    return source, vit


def test_download_once_into_the_cache(tiny_release, cache, capsys):
    source, vit = tiny_release
    model = neco_jax.load_backbone("tiny_release")
    target = cache / "tiny_release.pth"
    assert target.is_file() and target.read_bytes() == source.read_bytes()
    assert [p.name for p in cache.iterdir()] == ["tiny_release.pth"]  # no partial files left
    assert "downloading tiny_release" in capsys.readouterr().err  # progress bar
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), vit.pos_embed.detach().numpy())
    source.unlink()  # the second load reads the cache only
    assert neco_jax.load_backbone("tiny_release").config == model.config


def test_named_arch_comes_with_the_name(tiny_release):
    # The entry's overrides (pos_grid 4, depth 1) are applied: inference alone would agree here, so check the
    # entry is used by breaking it.
    pretrained.PRETRAINED["tiny_release"] = pretrained.Pretrained(
        pretrained.PRETRAINED["tiny_release"].url, "vit_small_patch14_dinov2", {"depth": 1}
    )
    with pytest.raises(UserError, match=r"pos_embed \(1, 17, 384\) vs \(1, 1370, 384\)"):
        neco_jax.load_backbone("tiny_release")


def test_url_source_is_cached_by_url(tiny_release, cache):
    source, _ = tiny_release
    model = neco_jax.load_backbone(source.as_uri())
    assert model.config.depth == 1
    (cached,) = (cache / "urls").iterdir()
    assert cached.name.endswith("-tiny_pretrain.pth")


def test_cli_to_jax_from_a_known_name(tiny_release, tmp_path):
    assert run_program("neco_jax.convert", "to-jax", "tiny_release", "--out", str(tmp_path / "out")) == 0
    assert neco_jax.load_backbone(tmp_path / "out").config.pos_grid == 4


def test_offline_download_names_url_and_manual_placement(monkeypatch, cache):
    url = "http://127.0.0.1:9/dinov2_vits14_pretrain.pth"
    monkeypatch.setitem(pretrained.PRETRAINED, "dinov2_vits14", pretrained.Pretrained(url, "vit_small_patch14_dinov2"))
    with pytest.raises(errors.DownloadError) as info:
        neco_jax.load_backbone("dinov2_vits14")
    message = str(info.value)
    assert f"could not download dinov2_vits14 from {url}" in message
    assert f"place the file at {cache / 'dinov2_vits14.pth'}" in message
    assert "pass the local file path" in message
    assert not (cache / "dinov2_vits14.pth").exists() and not any(cache.iterdir())


def test_manually_placed_file_is_used(tiny_release, cache, monkeypatch):
    source, _ = tiny_release
    entry = pretrained.Pretrained(
        "http://127.0.0.1:9/never.pth", "vit_small_patch14_dinov2", {"pos_grid": 4, "depth": 1}
    )
    monkeypatch.setitem(pretrained.PRETRAINED, "tiny_release", entry)
    cache.mkdir(parents=True)
    (cache / "tiny_release.pth").write_bytes(source.read_bytes())
    assert neco_jax.load_backbone("tiny_release").config.depth == 1


def test_connection_cut_mid_file_leaves_nothing_in_the_cache(cache, monkeypatch):
    class Truncating(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Truncating)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/w.pth"
    try:
        with pytest.raises(errors.DownloadError, match="after 10 of 1000 bytes"):
            pretrained.fetch(url)
    finally:
        thread.join(timeout=10)
        server.server_close()
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_unknown_pretrained_name_lists_known_names():
    with pytest.raises(UserError, match=r"unknown pretrained name 'dinov3_vits16'; known names: .*dinov2_vits14"):
        neco_jax.load_backbone("dinov3_vits16")


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv(pretrained.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pretrained.cache_dir() == tmp_path / ".cache" / "neco_jax"
