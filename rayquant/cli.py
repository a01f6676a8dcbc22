"""The `rayquant` command line. Every command imports its heavy modules inside its body, so
`rayquant plan` and friends start without torch or ray."""

from __future__ import annotations

import click

from rayquant import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rayquant")
def main() -> None:
    """Plan and run LoRA/QLoRA fine-tuning on a Ray cluster with whatever GPUs it has."""


# Commands are added below, one function each (planner: gpus, models, plan, estimate;
# training: train; cluster: inventory; kubernetes: k8s; quantization: calibrate).
