"""Train a multi-task model: ``python scripts/train.py [overrides]`` (Hydra; see configs/train.yaml).

python scripts/train.py                                  # the default run (`make run`)
python scripts/train.py data=multidigits model=mmoe mtl=pcgrad seed=1
python scripts/train.py -m mtl=ew,pcgrad,cagrad seed=0,1,2   # a local multirun sweep
python scripts/train.py trainer.resume=true hydra.run.dir=outputs/<run>   # continue a stopped run
"""

import signal
import sys

import hydra
from omegaconf import DictConfig

from corrjax.train.config import register_configs

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from corrjax.train.loop import run

    summary = run(cfg)
    if summary.get("stopped_by_signal"):
        # The checkpoint is saved; exit like the signal would (128 + signum), so that a local sweep stops instead of
        # starting its next job and a scheduler sees a preempted job, not a finished one.
        sys.exit(128 + signal.Signals[summary["stopped_by_signal"]].value)
    return summary.get("eval/loss", float("nan"))


if __name__ == "__main__":
    main()
