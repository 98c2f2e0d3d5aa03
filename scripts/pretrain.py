"""Pretrain a LLaMA with lrtrain (hydra). One run:

    python scripts/pretrain.py model=llama_60m optimizer=fira data=c4

a sweep (one run per value, then ``python scripts/compare.py outputs/sweeps/<sweep_name>``):

    python scripts/pretrain.py -m experiment=cpu_compare optimizer=adamw,galore,fira,frugal sweep_name=cpu_compare

Options live in ``configs/``; ``--cfg job`` prints the composed config, ``--help`` lists the groups.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from lrtrain.train.run import run


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):  # the sweep folder's name for every job of a sweep, none for a single run
        cfg.sweep_name = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    summary = run(config, hydra_cfg.runtime.output_dir)
    return summary.get("val/loss")


if __name__ == "__main__":
    main()
