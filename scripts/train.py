"""Train a multi-task model: ``python scripts/train.py [overrides]`` (Hydra; see configs/train.yaml).

python scripts/train.py                                  # the default run (`make run`)
python scripts/train.py data=multidigits model=mmoe mtl=pcgrad seed=1
python scripts/train.py -m mtl=ew,pcgrad,cagrad seed=0,1,2   # a local multirun sweep
python scripts/train.py trainer.resume=true hydra.run.dir=outputs/<run>   # continue a stopped run
python scripts/train.py trainer.overwrite=true hydra.run.dir=outputs/<run>   # replace that run's results
python scripts/train.py ckpt_path=outputs/<run> optim.learning_rate=1e-4   # fine-tune from that run's best checkpoint

The returned value (what a Hydra sweeper optimises) is the best validation value of ``trainer.monitor``
(``best/<monitor>`` in summary.json; :func:`corrjax.train.selection.objective`), never a test number: maximise it
for the default monitors (mean_score, delta_m) and for accuracy/pearson/r2, minimise it for loss/rmse (the summary's
``monitor_mode`` says which).

Every ``_target_`` must name a callable under corrjax, optax, flax or a package listed in ``allowed_targets`` in a
config file (corrjax.train.targets): overrides are checked before Hydra starts, the composed config before anything
is instantiated.
"""

import signal
import sys

import hydra
from omegaconf import DictConfig

from corrjax.train import targets
from corrjax.train.config import register_configs

register_configs()


def _command_line_overrides(argv: list[str]) -> list[str]:
    """The override arguments of a Hydra command line (its own flags such as ``-m`` or ``-cn name`` left out)."""
    from hydra._internal.utils import get_args_parser

    try:
        return list(get_args_parser().parse_known_args(argv)[0].overrides)
    except (SystemExit, Exception):  # Hydra reports its own usage errors
        return []


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from corrjax.train.loop import run
    from corrjax.train.selection import objective

    targets.check_config(cfg)
    summary = run(cfg)
    if summary.get("stopped_by_signal"):
        # The checkpoint is saved; exit like the signal would (128 + signum), so that a local sweep stops instead of
        # starting its next job and a scheduler sees a preempted job, not a finished one.
        sys.exit(128 + signal.Signals[summary["stopped_by_signal"]].value)
    return objective(summary)


if __name__ == "__main__":
    try:
        targets.check_overrides(_command_line_overrides(sys.argv[1:]))
    except targets.TargetNotAllowedError as e:
        sys.exit(f"error: {e}")
    main()
