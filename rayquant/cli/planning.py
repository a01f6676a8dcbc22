"""`rayquant plan` and `rayquant estimate`: the planning service (rayquant.planning) from flags."""

from __future__ import annotations

import click

from planner.vocab import (BACKENDS, CHECKPOINTING, DEFAULT_LORA_RANK, DEFAULT_LORA_TARGETS, OPTIMIZERS,
                           PREFERENCES, QUANTIZATIONS)

_CALIBRATION_HELP = ("Calibration file from `rayquant calibrate`: scales predicted memory and tokens/s "
                     "by the measured/predicted ratios for each GPU type and quantization.")


@click.command("plan")
@click.option("--model", "-m", required=True, help="Hub id from the catalog (`rayquant models`), or a "
              "local config.json / model directory.")
@click.option("--gpus", default=None, metavar="SPEC",
              help="Inventory as NODESxGPUSxGPU entries, e.g. 2x8xH100-80GB,4x1xA10G.")
@click.option("--inventory", type=click.Path(dir_okay=False), default=None,
              help="Inventory file (JSON or YAML list of rows: gpu, gpus_per_node, count, "
                   "host_memory_gib, cpus). Combined with --gpus when both are given.")
@click.option("--seq-len", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Tokens per training sequence.")
@click.option("--global-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences per optimizer step over all workers.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=DEFAULT_LORA_RANK, show_default=True,
              help="LoRA rank (alpha is the rank: planner.vocab.default_lora_alpha).")
@click.option("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS), show_default=True,
              help="Comma-separated linear layers to adapt, or 'all'.")
@click.option("--prefer", type=click.Choice(PREFERENCES), default="balanced",
              show_default=True, help="accuracy: most precise weights that fit; balanced/speed: "
                                      "fastest (speed also allows FP8 via our row-wise linear on Ada).")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS),
              default=None, help="Pin the quantization on every node type (default: the planner chooses).")
@click.option("--backend", type=click.Choice(BACKENDS), default="unsloth", show_default=True,
              help="Training stack the workers run.")
@click.option("--safety-margin", type=click.FloatRange(0.0, 0.9, max_open=True), default=0.10,
              show_default=True, help="Fraction of each GPU's memory the plan keeps free.")
@click.option("--full-finetune", is_flag=True, help="Train every weight (16-bit) instead of LoRA.")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help=_CALIBRATION_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--yaml", "as_yaml", is_flag=True, help="Print the plan as YAML.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the plan to FILE (JSON, or YAML with --yaml), atomically.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Draw each node type's memory breakdown against its GPU to FILE.png or FILE.svg.")
@click.option("--overwrite", is_flag=True,
              help="Replace -o/--plot files that hold a previous rayquant output (a file rayquant "
                   "did not write is never replaced).")
def plan_command(model, gpus, inventory, seq_len, global_batch, lora_rank, lora_targets, prefer,
                 quantization, backend, safety_margin, full_finetune, calibration_file, as_json, as_yaml,
                 output, plot, overwrite):
    """Plan a fine-tuning job on a (mixed) GPU inventory: per node type the quantization,
    micro-batch, accumulation, optimizer, checkpointing and placement, each with its reason.
    Imports neither torch nor ray."""
    from planner.atomic import check_output, write_atomically
    from rayquant import planning
    from rayquant.config import LoraOptions, SftOptions
    from rayquant.cli.errors import cli_spelling
    from rayquant.report import plan_table, plot_plan

    if as_json and as_yaml:
        raise click.UsageError("--json and --yaml exclude each other. To fix: pick one")
    if plot and not plot.lower().endswith((".png", ".svg")):
        raise click.BadParameter(f"{plot}: the file must end in .png or .svg. To fix: name it "
                                 "memory.png or memory.svg", param_hint="--plot")
    for path, what in ((output, "plan file"), (plot, "plot")):
        if path:
            check_output(path, overwrite=overwrite, what=what)
    if not gpus and not inventory:
        raise click.UsageError("no inventory. To fix: pass --gpus like 2x8xH100-80GB,4x1xA10G or "
                               "--inventory FILE")
    job = planning.job_spec(LoraOptions(rank=lora_rank, targets=lora_targets),
                            SftOptions(seq_len=seq_len, global_batch_size=global_batch, prefer=prefer,
                                       backend=backend, quantization=quantization),
                            safety_margin=safety_margin, full_finetune=full_finetune)
    plan = planning.make_plan(model, planning.node_types(gpus=gpus, inventory=inventory), job,
                              calibration=calibration_file)
    yaml_out = as_yaml or bool(output and output.endswith((".yaml", ".yml")))
    if yaml_out:
        import yaml

        text_yaml = yaml.safe_dump(plan.to_dict(), sort_keys=False)
    if output:
        write_atomically(output, text_yaml if yaml_out else plan.to_json() + "\n")
    if plot:
        plot_plan(plan, plot)
    if as_json:
        click.echo(plan.to_json())
    elif as_yaml:
        click.echo(text_yaml, nl=False)
    else:
        click.echo(plan_table(plan, cli_spelling))


@click.command("estimate")
@click.option("--model", "-m", required=True, help="Hub id from the catalog, or a local config.json "
              "/ model directory.")
@click.option("--gpu", "-g", required=True, help="GPU catalog name, NVML name, CPU, or a size like 24GiB.")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS),
              default="nf4", show_default=True, help="How the base weights are stored.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="NF4 double quantization (absmax stored in 8 bits).")
@click.option("--backend", type=click.Choice(BACKENDS), default="unsloth", show_default=True,
              help="unsloth: its kernels and chunked loss; hf: plain transformers + PEFT.")
@click.option("--seq-len", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Tokens per sequence.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences per forward/backward.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=DEFAULT_LORA_RANK, show_default=True,
              help="LoRA rank.")
@click.option("--lora-targets", default="all", show_default=True,
              help="Comma-separated linear layers to adapt, or 'all' (every linear of the decoder blocks).")
@click.option("--full-finetune", is_flag=True, help="Train every weight (needs bf16/fp16).")
@click.option("--gradient-checkpointing", type=click.Choice(CHECKPOINTING),
              default="unsloth", show_default=True,
              help="none; hf: keep layer inputs on the GPU; unsloth: offload them to host RAM.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS),
              default="adamw_8bit", show_default=True, help="Optimizer whose states are counted.")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help=_CALIBRATION_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@click.option("--compare", is_flag=True,
              help="Every quantization with both backends (each with its own checkpointing) side by "
                   "side: peak, fits, longest sequence, tokens/s. --quantization, --backend and "
                   "--gradient-checkpointing do not apply.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="With --compare: draw the peaks against the GPU's memory to FILE.png or FILE.svg.")
@click.option("--overwrite", is_flag=True,
              help="Replace a --plot file that holds a previous rayquant plot (never a user's file).")
def estimate_command(model, gpu, quantization, double_quant, backend, seq_len, micro_batch, lora_rank,
                     lora_targets, full_finetune, gradient_checkpointing, optimizer, calibration_file,
                     as_json, compare, plot, overwrite):
    """Predict peak memory, the longest sequence that fits, and tokens/s of one worker for one
    fixed configuration (or, with --compare, for every quantization and backend)."""
    import json

    from rayquant import planning
    from rayquant.config import LoraOptions
    from rayquant.report import compare_text, estimate_text, plot_compare

    if plot and not compare:
        raise click.UsageError("--plot draws the --compare table. To fix: add --compare")
    if plot and not plot.lower().endswith((".png", ".svg")):
        raise click.BadParameter(f"{plot}: the file must end in .png or .svg. To fix: name it "
                                 "compare.png or compare.svg", param_hint="--plot")
    if compare:
        if full_finetune:
            raise click.UsageError("--compare compares LoRA on quantized bases; --full-finetune needs "
                                   "16-bit weights. To fix: drop one of them")
        if plot:
            from planner.atomic import check_output

            check_output(plot, overwrite=overwrite, what="plot")
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise click.UsageError("--plot needs matplotlib, which is not installed. To fix: "
                                       "pip install matplotlib, or drop --plot") from None
        result = planning.compare(
            model, gpu, seq_len=seq_len, micro_batch_size=micro_batch, lora_rank=lora_rank,
            lora_targets=LoraOptions(targets=lora_targets).targets, double_quant=double_quant,
            optimizer=optimizer, calibration=calibration_file)
        if plot:
            plot_compare(result, plot)
        click.echo(json.dumps(result, indent=2) if as_json else compare_text(result))
        return
    result = planning.estimate(
        model, gpu, quantization=quantization, double_quant=double_quant, backend=backend,
        seq_len=seq_len, micro_batch_size=micro_batch, lora_rank=lora_rank,
        lora_targets=LoraOptions(targets=lora_targets).targets, full_finetune=full_finetune,
        gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, calibration=calibration_file)
    click.echo(json.dumps(result, indent=2) if as_json else estimate_text(result))


COMMANDS = (plan_command, estimate_command)
