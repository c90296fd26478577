"""Writes tests/data/pre_settings_checkpoint/: a training workdir as the code before the settings dataclasses
(commit 2551622, the parent of f8c4286) left it, for tests/test_old_checkpoint.py. Run it with that commit's
code first on the path:

    git worktree add /tmp/old2551622 2551622
    cd /tmp/old2551622 && PYTHONPATH=. python <repo>/tests/data/make_pre_settings_checkpoint.py \
        <repo>/tests/data/pre_settings_checkpoint
    git worktree remove --force /tmp/old2551622

Two runs of the old trainer (`train.train_and_evaluate`, what main.py calls) on the tests' tiny demo config
(4 steps, checkpoints every 2), on one CPU device: one stopped after step 2 as a pre-empted job is (its
checkpoint at step 2, metrics of steps 1-2, config.json, starts.jsonl) is kept as `workdir/`; the other runs
to the end and its metrics rows are kept as `old_code_metrics.jsonl`, what the old code computes at steps 3
and 4 after that checkpoint. The curves image and the TensorBoard events are left out (a resume reads neither).
"""

import json
import os
import shutil
import sys
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import neco_jax  # noqa: E402  (after the environment above)
from configs import base, demo  # noqa: E402
from neco_jax import train  # noqa: E402

FIELDS = {
    "optim.total_steps": 4,
    "checkpoint_every_steps": 2,
    "log_every_steps": 1,
    "export_at_end": False,
    "loss.roi_align_kernel_size": 4,  # today's demo (configs/demo.py); that commit's demo had 7
}


def tiny_config():
    """tests/train_fixtures.py's tiny_config(optim.total_steps=4, checkpoint_every_steps=2) at that commit, on
    today's demo grid."""
    c = demo.get_config()
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 1
    c.export_at_end = False
    return base.set_fields(c, FIELDS)


def main(out: str) -> None:
    code = os.path.dirname(neco_jax.__file__)
    if os.path.exists(os.path.join(code, "settings.py")):
        sys.exit(f"{code} is the code after the settings change: run this from a checkout of commit 2551622")
    if os.path.exists(out):
        sys.exit(f"{out} exists: remove it first")
    with tempfile.TemporaryDirectory() as tmp:
        full = os.path.join(tmp, "full")
        train.train_and_evaluate(tiny_config(), full)
        stopped = os.path.join(tmp, "workdir")
        result = train.train_and_evaluate(tiny_config(), stopped, stop_after=2)
        assert result["step"] == 2 and sorted(os.listdir(os.path.join(stopped, "checkpoints"))) == ["2"]
        os.remove(os.path.join(stopped, "metrics.png"))
        shutil.rmtree(os.path.join(stopped, "tensorboard"))
        os.makedirs(out)
        shutil.copytree(stopped, os.path.join(out, "workdir"))
        shutil.copyfile(os.path.join(full, "metrics.jsonl"), os.path.join(out, "old_code_metrics.jsonl"))
    print(json.dumps({"written": out, "code": code}))


if __name__ == "__main__":
    main(sys.argv[1])
