"""Sample from a checkpoint: `python generate.py ckpt=RUN_DIR prompt="To be" max_new_tokens=300`.

Thin on purpose: Hydra composes the typed config, gptmini.generation.run_generation does the work.
"""

import sys

import hydra
from omegaconf import DictConfig

from gptmini.cli import check_overrides, run_reporting_errors, to_dataclass
from gptmini.config import register_configs
from gptmini.generation import run_generation

register_configs()


@hydra.main(config_path="configs", config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    run_reporting_errors(lambda: run_generation(to_dataclass(cfg)))


if __name__ == "__main__":
    check_overrides("generate", sys.argv[1:])  # a bad override: one line, exit 2, before Hydra starts
    main()
