"""Train a GPT: `python train.py [overrides]`, e.g. `python train.py model/attention=mha train.max_iters=200`.

Thin on purpose: Hydra composes the typed config, gptmini.trainer.train does the work in Hydra's run directory.
"""

from gptmini.cli import prepare_train_launch, run_command
from gptmini.trainer import train

if __name__ == "__main__":
    prepare_train_launch()  # under torchrun: one run directory for all ranks
    run_command("train", train, with_run_dir=True)
