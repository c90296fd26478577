"""The training settings: configs/base.py is their defaults, every recipe and ablation resolves as before the
settings existed, a config reads back into settings, and each field's role (what a resume compares) is its own."""

import dataclasses
import importlib
import json
from pathlib import Path

import ml_collections
import pytest
from flax import traverse_util
from train_fixtures import RECIPES

from configs import base, demo
from input_pipeline.settings import LoaderSettings
from input_pipeline.views import ViewSettings
from neco_jax import errors, run_record, settings

ROOT = Path(__file__).resolve().parents[1]
# The configs of every recipe and ablation as they resolved before the settings dataclasses (see its "about").
BEFORE = json.loads((ROOT / "tests" / "recipe_values.json").read_text())


def _flat(config: ml_collections.ConfigDict) -> dict:
    flat = traverse_util.flatten_dict(json.loads(config.to_json()), keep_empty_nodes=True, sep=".")
    return {k: {} if v is traverse_util.empty_node else v for k, v in flat.items()}


def _settings_fields() -> dict:
    """'section.field' (or 'field' at the top level) -> the settings field, over every settings class."""
    return {
        (f"{section}.{f.name}" if section else f.name): f
        for section, types in settings.SECTIONS.items()
        for t in types
        for f in dataclasses.fields(t)
    }


def test_base_config_is_the_settings_defaults():
    """configs/base.py dumped field by field: exactly the settings classes' fields, each at its default (the one
    place a training default is written)."""
    dumped, fields = _flat(base.get_config()), _settings_fields()
    assert sorted(dumped) == sorted(fields)
    for name, field in fields.items():
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert dumped[name] == (list(default) if isinstance(default, tuple) else default), name
    assert settings.from_config(base.get_config()) == settings.TrainSettings()


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_and_ablations_resolve_as_before(name):
    """Every recipe with each ablation argument gives the values it gave before the settings dataclasses, less
    the retired fields and but for the fields changed on purpose since (listed with the recording); a field added
    since is at its default."""
    # Fields changed on purpose since the recording, for every recipe alike, then in this recipe: (value, why).
    changed = {field: value for field, (value, _) in BEFORE["changed"].items()}
    changed |= {field: value for field, (value, _) in BEFORE["changed_in_recipe"].get(name, {}).items()}
    recipe = {**BEFORE["dinov2_s14"], **BEFORE["recipes"][name], **changed}
    module = importlib.import_module(f"configs.{name}")
    for arg in ["", *sorted(base.ABLATIONS)]:
        want = {**recipe, **(BEFORE["ablations"][name][arg] if arg else {})}
        got = _flat(module.get_config(arg))
        for field in sorted(want.keys() | got.keys()):
            if field in settings.RETIRED:
                assert field not in got, (name, arg, field)
            elif field in want:
                assert got[field] == want[field], (name, arg, field)
            else:
                assert got[field] == settings.default_of(field), (name, arg, field)
    assert sorted(BEFORE["ablations"][name]) == sorted(base.ABLATIONS)


def test_a_config_reads_back_into_its_settings():
    changed = settings.TrainSettings(
        model=settings.ModelSettings(arch="vit_tiny_test", arch_overrides={"depth": 1}, dtype="bfloat16"),
        views=ViewSettings(size_crops=(56, 28), nmb_samples=(2, 2)),
        loader=LoaderSettings(dataset_name="sample", num_workers=0),
        loss=settings.LossSettings(sort_net="odd_even", use_queue=False),
        run=settings.RunSettings(seed=3, log_every_steps=1),
    )
    config = settings.to_config(changed)
    assert config.data.size_crops == (56, 28) and config.seed == 3 and config.model.arch_overrides.depth == 1
    assert settings.from_config(config) == changed
    assert settings.from_config(json.loads(config.to_json())) == changed  # a stored config.json too


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("loss.crops_for_assign", (0, 1), "config.loss.crops_for_assign is not a training setting"),
        ("model.widht", 3, "config.model.widht is not a training setting"),
        ("log_every", 3, "config.log_every is not a training setting"),
    ],
)
def test_a_field_no_settings_class_has_is_refused(field, value, message):
    config = demo.get_config()
    section, _, name = field.rpartition(".")
    with config.unlocked():
        (config[section] if section else config)[name] = value
    with pytest.raises(errors.ConfigError, match=f"^{message}; see neco_jax/settings.py$"):
        settings.from_config(config)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: settings.OptimSettings(batch_size=0), r"^config.optim.batch_size=0 must be >= 1$"),
        (lambda: settings.ModelSettings(drop_path_rate=1.0), r"^config.model.drop_path_rate=1.0 must lie in \[0, 1\)$"),
        (lambda: settings.EmaSettings(momentum=1.5), r"^config.ema.momentum=1.5 must lie in \[0, 1\]$"),
        (lambda: settings.LossSettings(teacher_steepness=0.0), r"^config.loss.teacher_steepness=0.0 must be > 0$"),
        (lambda: settings.ModelSettings(dtype="float16"), r"^config.model.dtype='float16' is not one of \('float32',"),
        (lambda: settings.RunSettings(seed=-1), r"^config.seed=-1 must be >= 0$"),
        (lambda: ViewSettings(size_crops=(56, 0)), r"^config.data.size_crops=\(56, 0\) must be >= 1$"),
        (lambda: LoaderSettings(max_bad_fraction=2.0), r"^config.data.max_bad_fraction=2.0 must lie in \[0, 1\]$"),
        (lambda: settings.EvalSettings(every_epochs=-1), r"^config.eval.every_epochs=-1 must be >= 0$"),
        (lambda: settings.ModelSettings(arch_overrides={"mlp_ratio": float("nan")}), r"arch_overrides.mlp_ratio=nan"),
    ],
)
def test_each_field_checks_its_own_values(build, message):
    with pytest.raises(errors.ConfigError, match=message):
        build()


def test_what_changes_the_computation_is_each_fields_own():
    """The fields a resume may change freely are those the settings mark as bookkeeping (the list run_record
    held before the settings did), the whole eval section, and the retired fields."""
    bookkeeping = {name for name in _settings_fields() if not settings.changes_computation(name)}
    assert bookkeeping == {
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "export_at_end",
        "data.num_workers",
        "data.threads_per_worker",
        "model.init",
        "model.remat",
        "model.attention",
        "init_timeout_s",
        "stop_check_every_steps",
        "eval.every_epochs",
        "eval.config",
        "eval.data_dir",
        "eval.set",
    }
    assert settings.changes_computation("model.arch_overrides.depth")  # inside a free-form field
    assert not settings.changes_computation("loss.crops_for_assign")
    assert settings.changes_computation("loss.unheard_of")  # unknown: assume it does


def test_a_workdir_recorded_before_the_settings_resumes(tmp_path):
    """A config.json written before the settings dataclasses (crops_for_assign stored, threads_per_worker not yet
    a field) compares equal in everything that computes; a new field away from its default does not."""
    old = json.loads(demo.get_config().to_json())
    old["loss"]["crops_for_assign"] = [0, 1]
    del old["data"]["threads_per_worker"]
    (tmp_path / run_record.CONFIG_FILE).write_text(json.dumps(old))
    assert run_record.check_resume(str(tmp_path), demo.get_config(), allow_change=False) == [
        "data.threads_per_worker: '<absent>' -> 2",
        "loss.crops_for_assign: [0, 1] -> '<absent>'",
    ]
    del old["loss"]["use_queue"]  # a computing field the stored run lacks, now away from its default
    (tmp_path / run_record.CONFIG_FILE).write_text(json.dumps(old))
    new = demo.get_config()
    new.loss.use_queue = False
    with pytest.raises(errors.ConfigChangedError, match=r"loss.use_queue: '<absent>' -> False"):
        run_record.check_resume(str(tmp_path), new, allow_change=False)
