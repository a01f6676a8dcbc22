"""The `rayquant` command line: a thin face on rayquant's services, one module per command group.

    planning.py   plan, estimate      (rayquant.planning, the planner)
    catalog.py    gpus, models        (the planner's catalogs)
    train.py      train               (rayquant.trainer)
    cluster.py    inventory           (rayquant.inventory)
    k8s.py        k8s                 (rayquant.planning, rayquant.k8s)
    calibrate.py  calibrate           (rayquant.calibrate)
    export.py     export              (rayquant.export)
    errors.py     exit codes and error messages for every command

Every command imports its heavy modules inside its body, so `import rayquant.cli` loads neither torch,
ray nor yaml, and `rayquant plan` starts as fast as Python.
"""

from __future__ import annotations

import click

from rayquant import __version__
from rayquant.cli import calibrate, catalog, cluster, export, k8s, planning, train
from rayquant.cli.errors import VERBOSE_ENV, Group, set_verbose

__all__ = ["main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rayquant")
@click.option("--verbose", is_flag=True,
              help=f"Show everything the libraries print (no noise filter, on the workers too) and the "
                   f"traceback of an internal error (a bug in rayquant); also {VERBOSE_ENV}=1.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Plan and run LoRA/QLoRA fine-tuning on a Ray cluster with whatever GPUs it has.

    Exit status: 0 success, 2 bad input (the message says how to fix it), 1 a failed run or an
    internal error, 130 a training run interrupted (Ctrl-C)."""
    if verbose:
        set_verbose(ctx)


for _module in (planning, catalog, train, export, cluster, k8s, calibrate):
    for _command in _module.COMMANDS:
        main.add_command(_command)
