"""Folder names for hydra sweeps, so that every job of a sweep has a folder of its own and running
the same sweep again resumes it.

Two OmegaConf resolvers, used by ``configs/train.yaml`` (register them before composing):

* ``${lrtrain_swept:<name part>,...}``: in a multirun, ``-key=value`` for every override the sweep
  varies (``optimizer.lr=0.005,0.01`` on the command line, or ``hydra.sweeper.params``), except a
  config-group choice whose value already is one of the given name parts (``method=galore`` in a
  name that says ``galore``). ``-m optimizer=galore,fira optimizer.lr=0.005,0.01`` gives
  ``llama_tiny-galore-dense-optimizer.lr=0.005`` and three more. Empty outside a multirun.
* ``${lrtrain_sweep_id:}``: the default sweep folder name, made from the sweep's command-line
  overrides (a readable part and a hash of all of them), so the same command finds the same folder.
"""

from __future__ import annotations

import hashlib
import re
import sys

from omegaconf import OmegaConf

#: Overrides that say where a sweep goes rather than what it computes.
_NOT_NAMING = ("sweep_name", "run_name", "output_root")


def _multirun_config():
    """The job's (or the sweep's) hydra config in a multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    config = HydraConfig.get()
    return config if config.mode == RunMode.MULTIRUN else None


def _command_line_overrides() -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if not a.startswith("-")])


def _key(override) -> str:
    return override.get_key_element().lstrip("+~")


def swept_keys(hydra_config) -> list[str]:
    """The keys a multirun varies: sweep overrides of the command line and ``hydra.sweeper.params``."""
    keys = [_key(o) for o in _command_line_overrides() if o.is_sweep_override()]
    params = OmegaConf.select(hydra_config, "sweeper.params", default=None) or {}
    keys += [str(k) for k in params if str(k) not in keys]
    return [k for k in keys if k not in _NOT_NAMING and not k.startswith("hydra.")]


def swept_suffix(*name_parts) -> str:
    config = _multirun_config()
    if config is None:
        return ""
    swept = set(swept_keys(config))
    parts = []
    for item in config.overrides.task:  # this job's own values, as "key=value"
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key not in swept:
            continue
        if "." not in key and "/" not in key and value in map(str, name_parts):
            continue  # a group choice the name already shows
        parts.append(f"-{key}={value}")
    return _safe("".join(parts))


def sweep_id() -> str:
    if _multirun_config() is None:
        return "sweep"
    overrides = sorted(str(a) for a in sys.argv[1:] if not a.startswith("-") and "=" in a
                       and a.partition("=")[0].lstrip("+~") not in _NOT_NAMING)
    readable = _safe("-".join(overrides))[:60].rstrip("-_.") or "sweep"
    return f"{readable}-{hashlib.sha256(chr(0).join(overrides).encode()).hexdigest()[:8]}"


def _safe(text: str) -> str:
    """A folder name: path separators and characters shells treat specially replaced."""
    return re.sub(r"[^A-Za-z0-9=,.+\-_]", "_", text)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("lrtrain_swept", swept_suffix, replace=True)
    OmegaConf.register_new_resolver("lrtrain_sweep_id", sweep_id, replace=True)
