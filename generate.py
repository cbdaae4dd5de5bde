"""Sample from a checkpoint: `python generate.py ckpt=RUN_DIR prompt="To be" max_new_tokens=300`.

Thin on purpose: Hydra composes the typed config, gptmini.generate_command.run_generation does the work.
"""

from gptmini.cli import run_command
from gptmini.generate_command import run_generation

if __name__ == "__main__":
    run_command("generate", run_generation)
