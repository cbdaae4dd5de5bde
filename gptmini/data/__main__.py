"""`python -m gptmini.data data=<name> [data.path=...] [data_dir=...] [force=true]`: prepare a dataset only."""

from gptmini.cli import run_command
from gptmini.data.preparation import prepare

if __name__ == "__main__":
    run_command("prepare", lambda cfg: prepare(cfg.data, cfg.data_dir, force=cfg.force))
