"""Train a GPT: `python train.py [overrides]`, e.g. `python train.py model/attention=mha train.max_iters=200`.

Thin on purpose: Hydra composes the typed config, gptmini.trainer.train does the work in Hydra's run directory.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gptmini.cli import check_overrides, prepare_train_launch, run_reporting_errors, to_dataclass
from gptmini.config import register_configs
from gptmini.trainer import train

register_configs()
prepare_train_launch()  # under torchrun: one run directory for all ranks


@hydra.main(config_path="configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    run_reporting_errors(lambda: train(to_dataclass(cfg), run_dir))


if __name__ == "__main__":
    check_overrides("train", sys.argv[1:])  # a bad override: one line, exit 2, before Hydra starts
    main()
