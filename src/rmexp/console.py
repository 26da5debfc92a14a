"""The console scripts' shell around a Hydra app: a mistake a user can fix is one line, never a traceback.

    def cli() -> None:
        console.run(app, RMExpConfig)        # app: the @hydra.main function

A `UserError` (rmexp.errors), a key Hydra does not know, a value of the wrong type or an override that does
not parse prints `error: <message>` on stderr and exits 1, with the nearest valid key for a typo
(`did you mean trainer.learning_rate?`) and the `key=value` form for an argparse habit (`--learning_rate 1e-4`).
`HYDRA_FULL_ERROR=1` raises instead, traceback and all; any other exception is a bug and keeps its traceback.
This module imports Hydra alone, so all of it happens in about a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import sys
import typing
from collections.abc import Callable, Iterator

from rmexp.errors import UserError

# Hydra's own flags (hydra/_internal/utils.py get_args_parser); anything else spelled --key is an argparse habit
HYDRA_FLAGS = {"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "--resolve", "-p", "--package", "-r",
               "--run", "-m", "--multirun", "-sc", "--shell-completion", "-cp", "--config-path", "-cn",
               "--config-name", "-cd", "--config-dir", "--experimental-rerun", "-i", "--info"}
# TRL's, peft's and transformers' command-line names for what rmexp names otherwise
ALIASES = {"lora_r": "lora.r", "lora_target_modules": "lora.target_modules", "model_name_or_path": "model.name_or_path",
           "dataset_name": "data.path", "output_dir": "hydra.run.dir", "use_peft": None}


def schema_keys(schema: type) -> list[str]:
    """Every key of a config schema (dataclasses, nested), dotted: `trainer`, `trainer.learning_rate`, ..."""

    def walk(cls, prefix: str) -> Iterator[str]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")

    return list(walk(schema, ""))


def nearest(key: str, keys: list[str]) -> list[str]:
    """The valid keys a mistyped or unprefixed `key` most likely meant (`learning_rat` -> trainer.learning_rate)."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key]
    if same_leaf:  # the right name in the wrong place, or without its group
        return same_leaf[:3]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    if close:
        return close
    by_leaf = {}
    for k in keys:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    return [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.8)]


def did_you_mean(key: str, keys: list[str]) -> str:
    found = nearest(key, keys)
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def argparse_habit(argv: list[str], keys: list[str]) -> str | None:
    """The message for a `--key value` or `--key=value` argument (TRL's and transformers' style), with the
    override that says it in Hydra's `key=value`; None when every argument is an override or Hydra's own flag."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg.split("=", 1)[0] in HYDRA_FLAGS:
            continue
        name, sep, value = arg[2:].partition("=")
        if not sep:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt else "<value>"
        name = name.replace("-", "_")
        if name in ALIASES and ALIASES[name] is None:
            return f"{arg}: rmexp takes key=value overrides, not --flags; it always trains a LoRA adapter"
        candidates = [ALIASES[name]] if name in ALIASES else nearest(name, keys)
        hint = " or ".join(f"{k}={value}" for k in candidates[:3])
        return (f"{arg}: rmexp takes key=value overrides (Hydra), not --flags: "
                + (f"write {hint}" if hint else f"see `{os.path.basename(sys.argv[0])} --cfg job` for the keys"))
    return None


def one_line(exc: BaseException, keys: list[str]) -> str | None:
    """The one-line message of an error the user can fix; None for a bug (which keeps its traceback)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(exc, UserError):
        return str(exc)
    cause = exc.__cause__
    if isinstance(exc, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        key = cause.full_key or ""
        return f"no key {key} in the config{did_you_mean(key, keys)}; `--cfg job` prints them all"
    if isinstance(exc, ConfigCompositionException) and isinstance(cause, (ValidationError, OmegaConfBaseException)):
        override = str(exc).removeprefix("Error merging override ")
        return f"{override}: {str(cause).splitlines()[0]}"
    if isinstance(exc, MissingConfigException) and exc.options and "/" in (exc.missing_cfg_file or ""):
        group, wanted = exc.missing_cfg_file.rsplit("/", 1)  # `model=tyni`: no such option of a group
        close = difflib.get_close_matches(wanted, exc.options, n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(f'{group}={c}' for c in close)}? " if close else ""
        return f"no {group} option '{wanted}' ({hint}options: {', '.join(exc.options)})"
    if isinstance(exc, ConfigCompositionException) and "Could not override" in str(exc):
        return " ".join(str(exc).split("\n")[:1]) + did_you_mean(str(exc).split("'")[1], keys)
    if isinstance(exc, OverrideParseException):
        return f"an override does not parse: {str(exc).splitlines()[0]} (Hydra's override grammar: quote values " \
               "with spaces or brackets, e.g. key='a b')"
    return None


class Reported(BaseException):
    """A UserError leaving a Hydra task (`reported`): a BaseException, so Hydra's job runner passes it on without
    its "Error executing job" report, to `run`, which prints the message."""


_traceback_wanted = False  # HYDRA_FULL_ERROR=1 as the user set it (run sets the variable itself)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Around a Hydra task's body: a UserError reaches `run` as one line (unless HYDRA_FULL_ERROR=1 asked for the
    traceback). Not around a multirun job, whose errors the sweep records and goes on from."""
    try:
        yield
    except UserError as e:
        if _traceback_wanted:
            raise
        raise Reported(str(e)) from e


def run(app: Callable[[], typing.Any], schema: type, argv_rewrite: Callable[[list[str]], list[str]] | None = None,
        presets: tuple[str, ...] = ()):
    """Run a @hydra.main `app` as a console script: argparse habits and user errors as `error: <message>` on
    stderr, exit 1. `argv_rewrite` may change the overrides before Hydra reads them (rmexp-train's resume);
    `presets`: the app's config groups that hold no key of the schema (suggested for a typo too)."""
    global _traceback_wanted
    full_error = _traceback_wanted = os.environ.get("HYDRA_FULL_ERROR") == "1"
    keys = schema_keys(schema) + list(presets)
    try:
        if habit := argparse_habit(sys.argv[1:], keys):
            raise UserError(habit)
        if argv_rewrite is not None:
            sys.argv[1:] = argv_rewrite(sys.argv[1:])
        # Hydra raises instead of printing its own report, so the error reaches the except below (jobs this process
        # launches inherit the variable: they run their task without Hydra's report, so nothing changes for them)
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            return app()
        finally:
            if not full_error:
                os.environ.pop("HYDRA_FULL_ERROR", None)
    except Reported as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - sorted below: the user's mistakes in one line, bugs re-raised
        message = one_line(e, keys)
        if message is None or full_error:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
