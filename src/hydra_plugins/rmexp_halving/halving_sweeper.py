"""`hydra/sweeper=halving`: rmexp's successive-halving sweeper (rmexp.halving), where Hydra looks for plugins."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper

from rmexp.halving import HalvingSweeper as _Halving


@dataclass
class HalvingSweeperConf:
    _target_: str = "hydra_plugins.rmexp_halving.halving_sweeper.HalvingSweeper"
    eta: int = 3                          # keep the best 1/eta of the cells at each rung
    rungs: list[float] | None = None   # the rungs as fractions of the planned steps; null: eta^-k, ..., 1/eta, 1
    rule: str = "rank"                    # rank: the best 1/eta by rung loss; guarded: and any the best does not beat
    statistic: str = "calibrated_loss"    # the rung split's per-pair statistic: calibrated_loss, loss or error
    params: dict[str, str] | None = None  # the grid, as the basic sweeper's: {lora.r: "4,8,16", ...}


ConfigStore.instance().store(group="hydra/sweeper", name="halving", node=HalvingSweeperConf, provider="rmexp")


class HalvingSweeper(_Halving, Sweeper):
    """The plugin class Hydra instantiates; the sweep itself is rmexp.halving.HalvingSweeper's."""
