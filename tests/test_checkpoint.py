"""Choosing the newest intact checkpoint: damaged ones named with step and file, a misfit one never skipped."""

import pytest

from neco_jax import checkpoint as ckpt_lib

TS_ERROR = ('OUT_OF_RANGE: Error reading "a/.zarray" in OCDBT database at local file "/w/checkpoints/4/state/": '
            'Error reading Byte range [0, 288) of local file "/w/checkpoints/4/state/d/b225ad": Requested byte range '
            '[0, 288) is not valid for value of size 144 [tensorstore_spec=\'{"driver": "zarr"}\']')


def _restore(results):
    def restore(step):
        if isinstance(results[step], Exception):
            raise results[step]
        return results[step]
    return restore


def test_falls_back_past_damaged_steps_naming_each():
    seen = []
    step, value = ckpt_lib.newest_intact(
        "/w/checkpoints", [2, 3, 4], _restore({4: ValueError(TS_ERROR), 3: OSError("bad metadata"), 2: "two"}),
        lambda *a: seen.append(a))
    assert (step, value) == (2, "two")
    assert seen == [(4, "/w/checkpoints/4/state/d/b225ad: Requested byte range [0, 288) is not valid for value of "
                        "size 144", 2), (3, "/w/checkpoints/3: bad metadata", 2)]


def test_no_intact_checkpoint_is_one_error_listing_them():
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        ckpt_lib.newest_intact("/w/checkpoints", [3, 4], _restore({4: ValueError(TS_ERROR), 3: KeyError("x")}),
                               lambda *a: pytest.fail("nothing restored"))
    assert str(info.value) == (
        "no checkpoint in /w/checkpoints can be read: step 4: /w/checkpoints/4/state/d/b225ad: Requested byte "
        "range [0, 288) is not valid for value of size 144; step 3: /w/checkpoints/3: 'x'; move the damaged ones "
        "away (e.g. rm -r /w/checkpoints/<step>) or use a fresh --workdir")


def test_a_checkpoint_that_does_not_fit_the_run_is_not_skipped():
    misfit = ckpt_lib.CheckpointError("does not match this run's model")
    with pytest.raises(ckpt_lib.CheckpointError, match="does not match"):
        ckpt_lib.newest_intact("/w/checkpoints", [3, 4], _restore({4: misfit, 3: "three"}),
                               lambda *a: pytest.fail("no fallback"))
