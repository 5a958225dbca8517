"""Entry point of the main job.

python -m distill_jax.main --workdir=/tmp/run [--config=configs/synthetic.py:tiny]
    [--config.student.embed_dim=32 ...]
"""

import logging
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from distill_jax import pipeline

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file[:variant].")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and the report.", required=True
)


def main(argv):
    del argv
    # Our progress at INFO; libraries (orbax, absl) only at WARNING and above.
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        force=True,
    )
    logging.getLogger("distill_jax").setLevel(logging.INFO)
    pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
