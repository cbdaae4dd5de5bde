"""Sample from a checkpoint: `python generate.py ckpt=RUN_DIR prompt="To be" max_new_tokens=300`.

Thin on purpose: Hydra composes the typed config, gptmini.generation.run_generation does the work.
"""

from gptmini.cli import run_command
from gptmini.generation import run_generation

if __name__ == "__main__":
    run_command("generate", run_generation)
