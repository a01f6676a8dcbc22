"""`rayquant calibrate`: measured peak memory and tokens/s next to the planner's predictions
(rayquant.calibrate), written as a calibration file the planner applies."""

from __future__ import annotations

import click

from planner.vocab import BACKENDS, CHECKPOINTING, QUANTIZATIONS


@click.command("calibrate")
@click.option("--model", required=True, metavar="M",
              help="Catalog id (built with random weights from its config, nothing downloaded) or a "
                   "local model directory.")
@click.option("--quantization", "quantizations", multiple=True, type=click.Choice(QUANTIZATIONS),
              help="Scheme to measure; repeat for several. Default: nf4 and bf16, plus fp8 where the "
                   "GPU has FP8 (compute capability >= 8.9).")
@click.option("--seq-len", "seq_lens", multiple=True, type=click.IntRange(min=1),
              help="Sequence length; repeat for several. Default: 512 and 2048.")
@click.option("--micro-batch", "micro_batches", multiple=True, type=click.IntRange(min=1),
              help="Micro-batch size; repeat for several. Default: 1.")
@click.option("--backend", type=click.Choice(BACKENDS), default="unsloth", show_default=True,
              help="Training stack to measure: the worker's Unsloth path or plain transformers+PEFT.")
@click.option("--gradient-checkpointing", type=click.Choice(CHECKPOINTING),
              default="unsloth", show_default=True, help="Gradient checkpointing mode.")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed optimizer steps per configuration (after one warm-up step).")
@click.option("--budget-s", type=click.FloatRange(min=1), default=None,
              help="Stop starting new configurations after this many seconds.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the random-weight checkpoints are written (default: a temporary directory).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run once per GPU type of a Ray cluster, as a task pinned to that type.")
@click.option("--address", default=None,
              help="Ray cluster address for --ray (default: RAY_ADDRESS, else a new local cluster).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the calibration file here (measurements already in it for other GPUs or "
                   "schemes are kept); the planner applies it as make_plan(calibration=...).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def calibrate_command(model, quantizations, seq_lens, micro_batches, backend, gradient_checkpointing,
                      steps, budget_s, workdir, use_ray, address, output, as_json) -> None:
    """Measure peak GPU memory and tokens/s for a few configurations next to the planner's
    predictions, and write a calibration file the planner applies for this GPU type.

    Needs a CUDA GPU (or --ray and a cluster with GPU nodes): without one it says so and exits
    with status 2."""
    import json
    import os
    import tempfile

    from planner.calibration import Calibration, CalibrationError
    from planner.model import load_model_spec
    from rayquant import calibrate as cal
    from rayquant import quiet
    from rayquant.cli.errors import RunFailedError, where_to_look

    # Known library noise filtered; with --json all but the document goes to stderr.
    stdout = click.get_current_context().with_resource(quiet.console(json=as_json))
    load_model_spec(model)
    if not use_ray:
        cal.check_cuda()
    if not quantizations:
        import torch

        from planner.hardware import fp8_path_for

        fp8 = use_ray or (torch.cuda.is_available()
                          and fp8_path_for(torch.cuda.get_device_capability(0)) is not None)
        quantizations = ("nf4", "bf16") + (("fp8",) if fp8 else ())
    cases = [cal.CalibrationCase(model, q, s, b, backend=backend,
                                 gradient_checkpointing=gradient_checkpointing)
             for q in quantizations for s in (seq_lens or (512, 2048)) for b in (micro_batches or (1,))]
    workdir = workdir or os.path.join(tempfile.gettempdir(), "rayquant-calibrate")
    if use_ray:
        results, calibration = cal.calibrate_cluster(cases, address=address, steps=steps,
                                                     budget_s=budget_s, workdir=workdir)
    else:
        results = cal.run_cases(cases, workdir, steps=steps, budget_s=budget_s)
        calibration = cal.calibration_from(results)
    if output:
        try:
            if os.path.exists(output):
                calibration = calibration.merged(Calibration.load(output))
        except CalibrationError as e:
            raise CalibrationError(f"{e.template} (or pass a new -o path)") from None
        calibration.save(output)
    if as_json:
        click.echo(json.dumps({"results": results, "calibration": calibration.to_dict()}, indent=2,
                              default=str), file=stdout)
    else:
        click.echo(cal.format_table(results))
        for row in calibration.to_dict()["factors"]:
            click.echo(f"{row['gpu']} {row['quantization']}: memory x{row['memory_factor']:.3f}, "
                       f"tokens/s x{row['throughput_factor']:.3f}")
        if output:
            click.echo(f"wrote {output}")
    if not any(r.get("status") == "ok" for r in results):
        where_to_look("Where to look: each configuration's error in the table above (`--json` adds "
                      "their tracebacks).")
        raise RunFailedError("no configuration could be measured; see the errors above")


COMMANDS = (calibrate_command,)
