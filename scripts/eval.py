"""Evaluate a checkpoint: ``python scripts/eval.py ckpt_path=<run dir or checkpoint step dir> [overrides]``.

The same Hydra config as ``scripts/train.py`` (``configs/train.yaml``) with ``trainer.mode=eval``: the composed
config must build the model the checkpoint holds (give the overrides the run was trained with, e.g. those in its
``.hydra/overrides.yaml``). A run directory gives its best checkpoint (else its newest). The checkpoint is evaluated
on ``trainer.eval_split`` (``eval/...``) and ``trainer.test_split`` (``test/...``); ``summary.json`` goes to this
run's own directory (``hydra.run.dir``, by default a new ``outputs/<name>/<time>``), never into the source run.

python scripts/eval.py ckpt_path=outputs/<name>/<stamp>
python scripts/eval.py ckpt_path=outputs/<name>/<stamp>/checkpoints/400 data=multidigits model=hps_lenet

Returns the monitored metric on the eval split (``eval/<monitor>``), like ``scripts/train.py`` returns its best.
"""

import sys

import hydra
from omegaconf import DictConfig, open_dict

from corrjax.train import targets
from corrjax.train.config import register_configs

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from corrjax.train.loop import run

    with open_dict(cfg):
        cfg.trainer.mode = "eval"
    targets.check_config(cfg)
    summary = run(cfg)
    value = summary.get(f"eval/{summary['monitor']}")
    return float("nan") if value is None else float(value)


def _command_line_overrides(argv: list[str]) -> list[str]:
    """The override arguments of a Hydra command line (as scripts/train.py reads them)."""
    from hydra._internal.utils import get_args_parser

    try:
        return list(get_args_parser().parse_known_args(argv)[0].overrides)
    except (SystemExit, Exception):  # Hydra reports its own usage errors
        return []


if __name__ == "__main__":
    try:
        targets.check_overrides(_command_line_overrides(sys.argv[1:]))
    except targets.TargetNotAllowedError as e:
        sys.exit(f"error: {e}")
    main()
