"""One process of a multi-process test run: `python main.py ...` with the dataset indices it loads recorded.

    NECO_TEST_INDEX_LOG=FILE python tests/multiprocess_worker.py --config=... --workdir=...

Each batch's `index` (the dataset records this process decoded, one per row) is appended to FILE as a JSON
line {"batch": n, "index": [...]}, so that the test can check which rows of every global batch each process
read. NECO_TEST_STEP_DELAY (seconds) slows every batch, so that a signal sent by the test lands mid-run.
"""

import json
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from input_pipeline import loader as loader_lib  # noqa: E402

# As tests/conftest.py sets it for the in-process runs. No persistent compilation cache (the test leaves it out of
# the environment): JAX writes entries from process 0 only and the two processes' keys differ (in a second launch
# process 0 loaded its step in 1.4 s while process 1 compiled it for 17 s), so process 0 would run ahead, and
# gloo gives up on a peer that joins a collective more than ~30 s late.
jax.config.update("jax_default_matmul_precision", "highest")

_fetch = loader_lib.TrainLoader.fetch  # what the trainer's prefetch calls (and plain iteration too)


def _recording_fetch(self):
    n = self.get_state()["next_batch"]
    batch = _fetch(self)
    with open(os.environ["NECO_TEST_INDEX_LOG"], "a") as f:
        f.write(json.dumps({"batch": n, "index": [int(i) for i in batch["index"]]}) + "\n")
    time.sleep(float(os.environ.get("NECO_TEST_STEP_DELAY", "0")))
    return batch


loader_lib.TrainLoader.fetch = _recording_fetch

if __name__ == "__main__":
    sys.argv[0] = str(ROOT / "main.py")
    runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
