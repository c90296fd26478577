"""Every job config's protocol section is built from its settings dataclass and reads back to it."""

import dataclasses
import importlib

import pytest

from evaluation import cbfe, hummingbird, linear, overcluster

JOBS = {
    "linear": ["voc", "coco_things", "coco_stuff", "ade20k", "cityscapes"],
    "overcluster": ["voc", "coco_things", "coco_stuff", "ade20k", "cityscapes"],
    "hummingbird": ["voc", "ade20k"],
    "cbfe": ["voc"],
}
MODULES = {"linear": linear, "overcluster": overcluster, "hummingbird": hummingbird, "cbfe": cbfe}
# What a dataset's job file changes on purpose (its reference loader differs), the rest must be the defaults.
CHANGED = {
    "voc_linear": {"select_drop_last": True},
    "ade20k_linear": {"drop_last": False},
    "cityscapes_linear": {"drop_last": False, "shuffle": True},
    "coco_stuff_linear": {"shuffle": True},
    "coco_things_linear": {"shuffle": True},
}
OVERRIDES = {  # protocol -> (field, value set, value read)
    "linear": ("crop_scale", [0.5, 0.9], (0.5, 0.9)),
    "overcluster": ("seeds", [7], (7,)),
    "hummingbird": ("k", 5, 5),
    "cbfe": ("cut_range", [0.5, 0.9], (0.5, 0.9)),
}


@pytest.mark.parametrize("job", [f"{d}_{p}" for p, datasets in JOBS.items() for d in datasets])
def test_job_config_reads_back_as_the_settings_defaults(job):
    dataset, protocol = job.rsplit("_", 1)
    module = MODULES[protocol]
    config = importlib.import_module(f"configs.eval.{job}").get_config()
    settings = module.settings_from_config(config)
    defaults = {f.name: f.default for f in dataclasses.fields(settings) if f.default is not dataclasses.MISSING}
    if protocol == "overcluster":
        defaults["ks"] = overcluster.default_ks(config.num_classes)
    if protocol in ("hummingbird", "cbfe"):  # the job writes every picture's example; Python returns none
        defaults["num_visualize"] = config.num_visualize
    assert dataclasses.asdict(settings) == {**defaults, **CHANGED.get(job, {})}
    # An override reaches the settings (lists, as a command line may give them, become the dataclass's tuples).
    field, value, expected = OVERRIDES[protocol]
    config[protocol][field] = value
    assert getattr(module.settings_from_config(config), field) == expected
