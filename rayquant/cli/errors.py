"""How a `rayquant` command ends: the one place that maps what went wrong to what the user sees
and the exit status.

    0  success
    2  the input is wrong (a config, dataset, option, plan request, output path, cluster address,
       a machine without the GPU the command needs; click's own usage errors): `Error: ...` with a
       `To fix:` line, no traceback
    1  the run failed (Ray, Ray Train, a worker, ranks that disagree): `Error: the run failed: ...`
       and where to look
    130 `rayquant train` interrupted (Ctrl-C): one line with where the run stopped and how to
       resume it (rayquant.cli.train)
    1  anything else is a bug in rayquant: `Internal error (a bug in rayquant): <type>: <message>`
       and how to see the traceback (`rayquant --verbose ...` or RAYQUANT_VERBOSE=1)

Errors that name settings as {placeholders} (planner.vocab.SettingError, rayquant.config.ConfigError)
are spelled the way the command takes them: its flags (`--seq-len`), or, for settings read from a
YAML config (`rayquant train`, `rayquant k8s`), the YAML key (`sft.seq_len`).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Mapping

import click

from rayquant import quiet
from rayquant.config import setting_of, yaml_spelling

VERBOSE_ENV = quiet.VERBOSE_ENV  # read by the trainer and its workers; `rayquant --verbose` sets it
USER_ERROR = 2
RUN_FAILED = 1
INTERNAL_ERROR = 1

# (module, class) of the errors of each kind. Classes are looked up only in modules already
# imported, so classifying imports nothing (an error's class is loaded when it was raised).
_RUN_FAILURES = (("ray.exceptions", "RayError"), ("ray.train.v2._internal.exceptions", "RayTrainError"),
                 ("ray.train.base_trainer", "TrainingFailedError"), ("rayquant.adapters", "AdapterMismatchError"),
                 ("rayquant.trainer", "TrainedNothingError"), ("rayquant.trainer", "RunFaultError"),
                 ("rayquant.export", "ExportCheckError"),
                 (__name__, "RunFailedError"))
# SettingError covers ConfigError, PlanError (InventoryError, CalibrationError, PlacementError, ...),
# OutputExistsError and ClusterConnectError.
_USER_ERRORS = (("planner.vocab", "SettingError"), ("rayquant.data", "DatasetError"),
                ("rayquant.k8s.errors", "K8sError"), ("rayquant.calibrate", "NoCudaError"))

_SPELLING = "rayquant.spelling"
_WHERE_TO_LOOK = "rayquant.where_to_look"
_VERBOSE = "rayquant.verbose"
DEFAULT_WHERE_TO_LOOK = ("Where to look: the workers' logs in Ray's session logs "
                         "(/tmp/ray/session_latest/logs on the head node).")

# Settings whose flag is not --<setting with dashes>.
_FLAGS = {"global_batch_size": "--global-batch", "micro_batch_size": "--micro-batch",
          "calibration": "--calibration FILE", "output": "-o"}


class RunFailedError(RuntimeError):
    """A command ran and failed for a reason that is neither its input nor rayquant's code (e.g.
    `rayquant calibrate` measured no configuration)."""


def cli_spelling(name: str) -> str:
    """A setting (planner.vocab's neutral name, or a config option path) as a flag: --seq-len."""
    setting = setting_of(name)
    if setting is None:
        return yaml_spelling(name)
    return _FLAGS.get(setting, "--" + setting.replace("_", "-"))


def flags_then_yaml(flags: Mapping[str, str]) -> Callable[[str], str]:
    """The spelling of a command that reads a YAML config: the settings it has flags for (neutral
    name -> flag) as flags, every other setting as its YAML key."""
    def spell(name: str) -> str:
        return flags.get(setting_of(name) or "", None) or yaml_spelling(name)

    return spell


def spell_with(spell: Callable[[str], str]) -> None:
    """Spell the settings this command's errors name with `spell` (default: cli_spelling)."""
    click.get_current_context().meta[_SPELLING] = spell


def where_to_look(text: str) -> None:
    """Say this (e.g. where the run's checkpoints are) when this command's run fails."""
    click.get_current_context().meta[_WHERE_TO_LOOK] = text


def verbose(meta: Mapping | None = None) -> bool:
    """True with `rayquant --verbose` or RAYQUANT_VERBOSE set (to anything but 0/false/no)."""
    if meta is not None and meta.get(_VERBOSE):
        return True
    return quiet.verbose()


def set_verbose(ctx: click.Context) -> None:
    """`rayquant --verbose`: tracebacks of internal errors, and VERBOSE_ENV set for the trainer
    (and Ray workers started from here) for the length of the command."""
    ctx.meta[_VERBOSE] = True
    previous = os.environ.get(VERBOSE_ENV)
    os.environ[VERBOSE_ENV] = "1"

    def restore() -> None:
        if previous is None:
            os.environ.pop(VERBOSE_ENV, None)
        else:
            os.environ[VERBOSE_ENV] = previous

    ctx.call_on_close(restore)


def _is_instance(error: BaseException, kinds: tuple[tuple[str, str], ...]) -> bool:
    for module, name in kinds:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False


def kind_of(error: BaseException) -> str:
    """"run" (the run failed), "user" (the input is wrong) or "internal" (a bug in rayquant). A
    worker's failure is the run's, whatever the worker raised."""
    if _is_instance(error, _RUN_FAILURES):
        return "run"
    if _is_instance(error, _USER_ERRORS):
        return "user"
    return "internal"


def report(error: Exception, meta: Mapping, command: str) -> int:
    """Print `error` as its kind says (see the module docstring) and return the exit status."""
    kind = kind_of(error)
    if kind == "user":
        render = getattr(error, "render", None)
        text = render(meta.get(_SPELLING, cli_spelling)) if render else str(error)
        if "To fix" not in text:
            text += f"\nTo fix: correct the input above; `{command} --help` lists every option."
        click.echo(f"Error: {text}", err=True)
        return USER_ERROR
    if verbose(meta):
        click.echo("".join(traceback.format_exception(error)).rstrip(), err=True)
    if kind == "run":
        render = getattr(error, "render", None)  # a run failure that names settings
        text = render(meta.get(_SPELLING, cli_spelling)) if render else str(error)
        what = text if isinstance(error, RunFailedError) else f"{type(error).__name__}: {text}"
        click.echo(f"Error: the run failed: {what}\n"
                   f"{meta.get(_WHERE_TO_LOOK, DEFAULT_WHERE_TO_LOOK)}", err=True)
        return RUN_FAILED
    click.echo(f"Internal error (a bug in rayquant): {type(error).__name__}: {error}", err=True)
    if not verbose(meta):
        click.echo(f"To see the traceback, run it again with `rayquant --verbose ...` (or "
                   f"{VERBOSE_ENV}=1), and please report it with the traceback.", err=True)
    return INTERNAL_ERROR


class Group(click.Group):
    """A click group whose commands end as `report` says: every error not click's own is mapped to
    its exit status here, once, instead of in each command."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:  # the one place: mapped to its kind, never re-raised
            command = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
            ctx.exit(report(error, ctx.meta, command))
