"""`python -m gptmini.data data=<name> [data.path=...] [data_dir=...] [force=true]`: prepare a dataset only."""

from gptmini.cli import hydra_main
from gptmini.data.preparation import prepare

if __name__ == "__main__":
    hydra_main("prepare", lambda cfg: prepare(cfg.data, cfg.data_dir, force=cfg.force))
