"""`key=value` arguments for the small tools (score, export), typed by a dataclass like Hydra's."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


def parse(schema, argv: list[str] | None = None, usage: str = ""):
    """Merge `key=value` words onto the dataclass `schema`; a typo or a missing key exits naming it."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        sys.exit(0)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(argv))
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as e:
        sys.exit(f"error: {e}\n{usage}")
    if missing:
        sys.exit(f"error: missing {', '.join(missing)}\n{usage}")
    return cfg
