"""Sample from a checkpoint: `python generate.py ckpt=RUN_DIR prompt="To be" max_new_tokens=300`.

Thin on purpose: Hydra composes the typed config, gptmini.generation.run_generation does the work.
"""

import hydra
from omegaconf import DictConfig

from gptmini.cli import run_reporting_errors, to_dataclass
from gptmini.config import register_configs
from gptmini.generation import run_generation

register_configs()


@hydra.main(config_path="configs", config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    run_reporting_errors(lambda: run_generation(to_dataclass(cfg)))


if __name__ == "__main__":
    main()
