"""Training recipes: `get_config()` of each file returns the locked ConfigDict of one row of the results table.

Installed with the other packages, so that a config file given by path (`--config=configs/<recipe>.py`) can
import `configs.base` from any working directory. `eval/` holds the evaluation job configs.
"""
