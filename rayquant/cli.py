"""The `rayquant` command line. Every command imports its heavy modules inside its body, so
`rayquant plan` and friends start without torch or ray."""

from __future__ import annotations

import click

from planner.atomic import write_atomically
from rayquant import __version__
from rayquant.report import gib, plan_table, plot_plan, table


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rayquant")
def main() -> None:
    """Plan and run LoRA/QLoRA fine-tuning on a Ray cluster with whatever GPUs it has."""


# Commands are added below, one function each (planner: gpus, models, plan, estimate;
# training: train; cluster: inventory; kubernetes: k8s; quantization: calibrate).


@main.command("train")
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True,
              help="Check the config and every dataset row, print the plan and exit (loads no "
                   "weights, starts no Ray).")
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for the adapter and manifest.json (default: "
                   "<run.storage_path>/<run.name>/adapter).")
@click.option("--overwrite", is_flag=True,
              help="Replace the output directory if it holds a previous rayquant adapter (a folder "
                   "rayquant did not write is never replaced).")
@click.option("--address", default=None,
              help="Ray address, overriding the config's (default: RAY_ADDRESS, else a local cluster).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the plan (with --dry-run) or the result (adapter, manifest) as JSON.")
def train_command(config_path: str, dry_run: bool, output_dir: str | None, overwrite: bool,
                  address: str | None, as_json: bool) -> None:
    """Fine-tune with LoRA/QLoRA on Ray as a YAML config says: plan, train on Ray Train workers
    (Unsloth + TRL), gather one adapter plus manifest.json. The YAML schema is documented in
    rayquant/config.py; examples/quickstart.yaml is a complete example.

    \b
    rayquant train examples/quickstart.yaml --dry-run   # plan + data check only
    rayquant train examples/quickstart.yaml             # train; prints progress and the adapter path
    """
    import dataclasses
    import json

    from planner.atomic import OutputExistsError
    from planner.plan import PlanError
    from rayquant.config import ConfigError, load_train_config
    from rayquant.data import DatasetError

    try:
        cfg = load_train_config(config_path)
        run = dataclasses.replace(cfg.run, output_dir=output_dir) if output_dir else cfg.run
        run = dataclasses.replace(run, overwrite=True) if overwrite else run
        from rayquant.trainer import RayQuantTrainer

        trainer = RayQuantTrainer(model=cfg.model, dataset=cfg.dataset, plan=cfg.plan, lora=cfg.lora,
                                  sft=cfg.sft, scaling=cfg.scaling, run=run, address=address or cfg.address)
        if dry_run:
            if run.output_dir:
                from rayquant.adapters import check_adapter_output

                check_adapter_output(run.output_dir, run.overwrite)
            data = trainer.prepare_data()
            plan = trainer.plan()
            if as_json:
                click.echo(json.dumps({"plan": plan.to_dict(), "dataset": {
                    "path": cfg.dataset, "rows": data.num_rows, "format": data.format}}, indent=2))
            else:
                click.echo(plan_table(plan))
                click.echo(f"\nDataset {cfg.dataset}: {data.num_rows} rows, format {data.format}, all rows OK.")
                click.echo("Dry run: nothing trained. Drop --dry-run to train.")
            return
        if not as_json:
            click.echo(plan_table(trainer.plan()))
        result = trainer.fit()
    except (ConfigError, DatasetError, PlanError, OutputExistsError) as e:
        _planner_error(e)
    except Exception as e:
        import ray.exceptions
        from ray.train import TrainingFailedError

        if not isinstance(e, (TrainingFailedError, ray.exceptions.RayError)):
            raise
        click.echo(f"Error: training failed: {type(e).__name__}: {e}\nThe run's checkpoints are kept "
                   f"under run.storage_path ({cfg.run.storage_path}); worker logs are in Ray's session "
                   f"logs (/tmp/ray/session_latest/logs on the head node).", err=True)
        raise SystemExit(1)
    if as_json:
        click.echo(json.dumps({"adapter_dir": str(result.adapter_dir), "run_dir": str(result.run_dir),
                               "manifest": result.manifest}, indent=2, default=str))
    else:
        loss = result.manifest.get("loss", {})
        click.echo(f"Loss {loss.get('first', float('nan')):.4f} -> {loss.get('last', float('nan')):.4f} "
                   f"over {result.manifest['run']['steps']} steps; adapter sha256 "
                   f"{result.manifest['adapter_sha256'][:16]}")
        click.echo(f"Adapter: {result.adapter_dir}")


@main.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def gpus_command(as_json: bool) -> None:
    """List the GPU catalog: memory (as NVML reports it), compute capability, bf16/FP8 support,
    dense tensor-core TFLOPS and memory bandwidth. The CPU row is the pseudo-device of CPU-only
    clusters (its memory is this machine's RAM)."""
    import json

    from planner.hardware import GPU_CATALOG, cpu_device

    gpus = (*GPU_CATALOG, cpu_device())
    if as_json:
        click.echo(json.dumps([{
            "name": g.name, "nvml_names": list(g.nvml_names), "memory_bytes": g.memory_bytes,
            "memory_gib": round(g.memory_gib, 2), "compute_capability": g.compute_capability_str,
            "bf16": g.supports_bf16, "fp8": g.supports_fp8, "bf16_tflops": g.bf16_tflops,
            "fp16_tflops": g.fp16_tflops, "fp8_tflops": g.fp8_tflops,
            "bandwidth_gb_per_s": g.bandwidth_gb_per_s, "source": g.source} for g in gpus], indent=2))
        return
    rows = [[g.name, f"{g.memory_gib:.1f}", g.compute_capability_str,
             "yes" if g.supports_bf16 else "no", "yes" if g.supports_fp8 else "no",
             f"{g.tflops_16bit:g}", f"{g.fp8_tflops:g}" if g.fp8_tflops else "-",
             f"{g.bandwidth_gb_per_s:g}", ", ".join(g.nvml_names) or "-"] for g in gpus]
    click.echo(table(["GPU", "GiB", "CC", "bf16", "FP8", "16-bit TFLOPS", "FP8 TFLOPS",
                               "GB/s", "NVML names"], rows, right={1, 5, 6, 7}))
    click.echo("\nTFLOPS are dense tensor-core peaks (bf16, else fp16). Also accepted: NVML names "
               "and bare sizes such as 24GiB (a generic GPU). `--json` shows each row's sources.")


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
@click.option("--filter", "filter_text", default=None, metavar="TEXT",
              help="Only models whose id, architecture or model type contains TEXT "
                   "(case-insensitive).")
def models_command(as_json: bool, filter_text: str | None) -> None:
    """List the built-in model catalog (offline architectures keyed by hub id) with exact
    parameter counts. Any local config.json or model directory works too."""
    import json

    from planner.catalog_models import MODEL_CATALOG

    needle = (filter_text or "").lower()
    specs = [(k, m) for k, m in MODEL_CATALOG.items()
             if needle in f"{k} {m.architecture} {m.model_type}".lower()]
    if as_json:
        click.echo(json.dumps([{
            "id": k, "architecture": m.architecture, "model_type": m.model_type,
            "num_params": m.num_params, "active_params": m.active_params,
            "num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_key_value_heads, "head_dim": m.head_dim,
            "intermediate_size": m.intermediate_size, "vocab_size": m.vocab_size,
            "num_experts": m.num_experts, "num_experts_per_tok": m.num_experts_per_tok,
            "tie_word_embeddings": m.tie_word_embeddings, "params_breakdown": m.params_breakdown(),
            "source": m.source} for k, m in specs], indent=2))
        return
    if not specs:
        raise click.ClickException(f"no catalog model matches {filter_text!r}; run `rayquant "
                                   "models` without --filter to see them all")

    def billions(n: int) -> str:
        return f"{n / 1e9:.2f}B"

    rows = [[k, m.architecture, billions(m.num_params)
             + (f" ({billions(m.active_params)} active)" if m.is_moe else ""),
             m.num_layers, m.hidden_size, f"{m.num_attention_heads}/{m.num_key_value_heads}",
             m.vocab_size] for k, m in specs]
    click.echo(table(["id", "architecture", "params", "layers", "hidden", "heads/kv",
                               "vocab"], rows, right={2, 3, 4, 6}))
    click.echo("\nInstruct/chat variants and unsloth/...-bnb-4bit or -FP8 names map to these rows; "
               "the org prefix is optional.")


@main.command("calibrate")
@click.option("--model", required=True, metavar="M",
              help="Catalog id (built with random weights from its config, nothing downloaded) or a "
                   "local model directory.")
@click.option("--quantization", "quantizations", multiple=True,
              type=click.Choice(["bf16", "fp16", "nf4", "dynamic-4bit", "fp8"]),
              help="Scheme to measure; repeat for several. Default: nf4 and bf16, plus fp8 where the "
                   "GPU has FP8 (compute capability >= 8.9).")
@click.option("--seq-len", "seq_lens", multiple=True, type=click.IntRange(min=1),
              help="Sequence length; repeat for several. Default: 512 and 2048.")
@click.option("--micro-batch", "micro_batches", multiple=True, type=click.IntRange(min=1),
              help="Micro-batch size; repeat for several. Default: 1.")
@click.option("--backend", type=click.Choice(["unsloth", "hf"]), default="unsloth", show_default=True,
              help="Training stack to measure: the worker's Unsloth path or plain transformers+PEFT.")
@click.option("--gradient-checkpointing", type=click.Choice(["none", "hf", "unsloth"]),
              default="unsloth", show_default=True, help="Gradient checkpointing mode.")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed optimizer steps per configuration (after one warm-up step).")
@click.option("--budget-s", type=click.FloatRange(min=1), default=None,
              help="Stop starting new configurations after this many seconds.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the random-weight checkpoints are written (default: a temporary directory).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run once per GPU type of a Ray cluster, as a task pinned to that type.")
@click.option("--address", default=None, help="Ray cluster address for --ray (default: RAY_ADDRESS).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the calibration file here (measurements already in it for other GPUs or "
                   "schemes are kept); the planner applies it as make_plan(calibration=...).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def calibrate_command(model, quantizations, seq_lens, micro_batches, backend, gradient_checkpointing,
                      steps, budget_s, workdir, use_ray, address, output, as_json) -> None:
    """Measure peak GPU memory and tokens/s for a few configurations next to the planner's
    predictions, and write a calibration file the planner applies for this GPU type."""
    import json
    import os
    import tempfile

    from planner.calibration import Calibration, CalibrationError
    from planner.model import load_model_spec
    from planner.plan import PlanError

    try:
        load_model_spec(model)
    except PlanError as e:
        raise click.ClickException(str(e)) from None
    from rayquant import calibrate as cal

    if not use_ray:
        try:
            cal.check_cuda()
        except cal.NoCudaError as e:
            raise click.ClickException(str(e)) from None
    if not quantizations:
        import torch

        fp8 = use_ray or (torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 9))
        quantizations = ("nf4", "bf16") + (("fp8",) if fp8 else ())
    cases = [cal.CalibrationCase(model, q, s, b, backend=backend,
                                 gradient_checkpointing=gradient_checkpointing)
             for q in quantizations for s in (seq_lens or (512, 2048)) for b in (micro_batches or (1,))]
    workdir = workdir or os.path.join(tempfile.gettempdir(), "rayquant-calibrate")
    if use_ray:
        try:
            results, calibration = cal.calibrate_cluster(cases, address=address, steps=steps,
                                                         budget_s=budget_s, workdir=workdir)
        except cal.NoCudaError as e:
            raise click.ClickException(str(e)) from None
    else:
        results = cal.run_cases(cases, workdir, steps=steps, budget_s=budget_s)
        calibration = cal.calibration_from(results)
    if output:
        try:
            if os.path.exists(output):
                calibration = calibration.merged(Calibration.load(output))
        except CalibrationError as e:
            raise click.ClickException(f"{e} (or pass a new -o path)") from None
        calibration.save(output)
    if as_json:
        click.echo(json.dumps({"results": results, "calibration": calibration.to_dict()}, indent=2,
                              default=str))
    else:
        click.echo(cal.format_table(results))
        for row in calibration.to_dict()["factors"]:
            click.echo(f"{row['gpu']} {row['quantization']}: memory x{row['memory_factor']:.3f}, "
                       f"tokens/s x{row['throughput_factor']:.3f}")
        if output:
            click.echo(f"wrote {output}")
    if not any(r.get("status") == "ok" for r in results):
        raise click.ClickException("no configuration could be measured; see the errors above")


# -- planner: plan / estimate -------------------------------------------------------------------


_CLI_SPELLING = {"global_batch_size": "--global-batch", "micro_batch_size": "--micro-batch",
                 "calibration": "--calibration FILE", "output": "-o"}


def cli_spelling(setting: str) -> str:
    """A setting's neutral name (planner.vocab.SETTINGS) as this CLI's option."""
    return _CLI_SPELLING.get(setting, "--" + setting.replace("_", "-"))


def _planner_error(e: Exception) -> None:
    """A user mistake (PlanError/ValueError): one clear message, exit code 2, no traceback."""
    from planner.vocab import SettingError

    click.echo(f"Error: {e.render(cli_spelling) if isinstance(e, SettingError) else e}", err=True)
    raise SystemExit(2)


def _split_targets(text: str) -> tuple[str, ...]:
    parts = tuple(t.strip() for t in text.split(",") if t.strip())
    return ("all",) if parts == ("all",) else parts


@main.command("plan")
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
@click.option("--lora-rank", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
              show_default=True, help="Comma-separated linear layers to adapt, or 'all'.")
@click.option("--prefer", type=click.Choice(["accuracy", "balanced", "speed"]), default="balanced",
              show_default=True, help="accuracy: most precise weights that fit; balanced/speed: "
                                      "fastest (speed also allows FP8 via our row-wise linear on Ada).")
@click.option("--quantization", type=click.Choice(["bf16", "fp16", "nf4", "dynamic-4bit", "fp8"]),
              default=None, help="Pin the quantization on every node type (default: the planner chooses).")
@click.option("--backend", type=click.Choice(["unsloth", "hf"]), default="unsloth", show_default=True,
              help="Training stack the workers run.")
@click.option("--safety-margin", type=click.FloatRange(0.0, 0.9, max_open=True), default=0.10,
              show_default=True, help="Fraction of each GPU's memory the plan keeps free.")
@click.option("--full-finetune", is_flag=True, help="Train every weight (16-bit) instead of LoRA.")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration file from `rayquant calibrate`: scales predicted memory and tokens/s "
                   "by the measured/predicted ratios for each GPU type and quantization.")
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
    from planner.atomic import OutputExistsError, check_output
    from planner.calibration import Calibration
    from planner.hardware import parse_gpu_spec
    from planner.plan import JobSpec, PlanError
    from planner.search import make_plan
    from rayquant.inventory import load_inventory_file

    if as_json and as_yaml:
        _planner_error(PlanError("--json and --yaml exclude each other: pick one"))
    if plot and not plot.lower().endswith((".png", ".svg")):
        _planner_error(PlanError(f"--plot {plot}: the file must end in .png or .svg"))
    try:
        for path, what in ((output, "plan file"), (plot, "plot")):
            if path:
                check_output(path, overwrite=overwrite, what=what)
    except OutputExistsError as e:
        _planner_error(e)
    try:
        if not gpus and not inventory:
            raise PlanError("no inventory: pass --gpus like 2x8xH100-80GB,4x1xA10G or "
                            "--inventory FILE")
        node_types = (parse_gpu_spec(gpus) if gpus else ()) + (load_inventory_file(inventory) if inventory else ())
        job = JobSpec(seq_len=seq_len, global_batch_size=global_batch, lora_rank=lora_rank,
                      lora_targets=_split_targets(lora_targets), prefer=prefer, backend=backend,
                      safety_margin=safety_margin, quantization=quantization,
                      full_finetune=full_finetune)
        calibration = Calibration.load(calibration_file) if calibration_file else None
        plan = make_plan(model, node_types, job, calibration=calibration)
    except (PlanError, ValueError) as e:
        _planner_error(e)
    text_json = plan.to_json()
    if as_yaml or (output and output.endswith((".yaml", ".yml"))):
        import yaml

        text_yaml = yaml.safe_dump(plan.to_dict(), sort_keys=False)
    if output:
        write_atomically(output, text_yaml if (as_yaml or output.endswith((".yaml", ".yml"))) else text_json + "\n")
    if plot:
        plot_plan(plan, plot)
    if as_json:
        click.echo(text_json)
    elif as_yaml:
        click.echo(text_yaml, nl=False)
    else:
        click.echo(plan_table(plan))


@main.command("estimate")
@click.option("--model", "-m", required=True, help="Hub id from the catalog, or a local config.json "
              "/ model directory.")
@click.option("--gpu", "-g", required=True, help="GPU catalog name, NVML name, CPU, or a size like 24GiB.")
@click.option("--quantization", type=click.Choice(["bf16", "fp16", "nf4", "dynamic-4bit", "fp8"]),
              default="nf4", show_default=True, help="How the base weights are stored.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="NF4 double quantization (absmax stored in 8 bits).")
@click.option("--backend", type=click.Choice(["unsloth", "hf"]), default="unsloth", show_default=True,
              help="unsloth: its kernels and chunked loss; hf: plain transformers + PEFT.")
@click.option("--seq-len", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Tokens per sequence.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences per forward/backward.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-targets", default="all", show_default=True,
              help="Comma-separated linear layers to adapt, or 'all' (every linear of the decoder blocks).")
@click.option("--full-finetune", is_flag=True, help="Train every weight (needs bf16/fp16).")
@click.option("--gradient-checkpointing", type=click.Choice(["none", "hf", "unsloth"]),
              default="unsloth", show_default=True,
              help="none; hf: keep layer inputs on the GPU; unsloth: offload them to host RAM.")
@click.option("--optimizer", type=click.Choice(["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]),
              default="adamw_8bit", show_default=True, help="Optimizer whose states are counted.")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration file from `rayquant calibrate`: scales predicted memory and tokens/s "
                   "by the measured/predicted ratios for each GPU type and quantization.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate_command(model, gpu, quantization, double_quant, backend, seq_len, micro_batch, lora_rank,
                     lora_targets, full_finetune, gradient_checkpointing, optimizer, calibration_file,
                     as_json):
    """Predict peak memory, the longest sequence that fits, and tokens/s of one worker for one
    fixed configuration."""
    import json

    from planner.calibration import Calibration, calibrated_peak_bytes
    from planner.hardware import lookup_gpu
    from planner.memory import estimate_memory, max_seq_len
    from planner.model import load_model_spec
    from planner.plan import PlanError
    from planner.throughput import tokens_per_second

    notes = []
    try:
        spec = load_model_spec(model)
        device = lookup_gpu(gpu)
        if gradient_checkpointing == "unsloth" and backend == "hf":
            raise PlanError("--gradient-checkpointing unsloth needs --backend unsloth. To fix: use "
                            "--gradient-checkpointing hf with --backend hf")
        if quantization == "bf16" and not device.supports_bf16 and not device.is_cpu:
            notes.append(f"{device.name} has no bf16: the same bytes in fp16")
        if quantization == "fp8" and not device.supports_fp8:
            notes.append(f"{device.name} has no FP8 tensor cores: memory as FP8, no FP8 speedup")
        config = dict(quantization=quantization, double_quant=double_quant, backend=backend,
                      micro_batch_size=micro_batch, lora_rank=lora_rank,
                      lora_targets=_split_targets(lora_targets), full_finetune=full_finetune,
                      gradient_checkpointing=gradient_checkpointing, optimizer=optimizer)
        est = estimate_memory(spec, device, seq_len=seq_len, **config)
        longest = max_seq_len(spec, device, **config)
        tps = tokens_per_second(spec, device, quantization=quantization, seq_len=seq_len,
                                micro_batch_size=micro_batch, lora_rank=lora_rank,
                                lora_targets=_split_targets(lora_targets), full_finetune=full_finetune,
                                gradient_checkpointing=gradient_checkpointing)
        factors = None
        peak = est.peak_bytes
        if calibration_file:
            cal = Calibration.load(calibration_file)
            factors = {"file": calibration_file,
                       "memory_factor": cal.memory_factor(device.name, quantization),
                       "throughput_factor": cal.throughput_factor(device.name, quantization)}
            peak = calibrated_peak_bytes(est, factors["memory_factor"])
            tps *= factors["throughput_factor"]
            notes.append(f"calibrated from {calibration_file}: memory x{factors['memory_factor']:.3f}, "
                         f"tokens/s x{factors['throughput_factor']:.3f}; breakdown and max_seq_len "
                         "are uncalibrated predictions")
    except (PlanError, ValueError) as e:
        _planner_error(e)
    fits = peak <= device.memory_bytes
    result = {
        "model": spec.name, "gpu": device.name, "gpu_memory_bytes": device.memory_bytes,
        "config": {"seq_len": seq_len, **{k: list(v) if isinstance(v, tuple) else v
                                          for k, v in config.items()}},
        "peak_memory_bytes": peak, "predicted_peak_memory_bytes": est.peak_bytes,
        "allocated_bytes": est.allocated_bytes, "reserved_bytes": est.reserved_bytes,
        "breakdown_bytes": est.breakdown.as_dict(), "host_memory_bytes": est.host_bytes,
        "trainable_params": est.trainable_params, "fits": fits, "max_seq_len": longest,
        "tokens_per_second": tps, "calibration": factors, "notes": notes,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{spec.name} on {device.name} ({device.memory_gib:.1f} GiB): {quantization}, "
               f"seq {seq_len} x micro-batch {micro_batch}, {gradient_checkpointing} checkpointing, "
               f"{optimizer}, {backend} backend")
    rows = [[k, gib(v)] for k, v in est.breakdown.as_dict().items()]
    rows.append(["peak", gib(est.peak_bytes)])
    click.echo(table(["term", "GiB"], rows, right={1}))
    click.echo(f"\nfits: {'yes' if fits else 'NO'} ({gib(peak)} of "
               f"{device.memory_gib:.2f} GiB); longest sequence that fits at micro-batch "
               f"{micro_batch}: {longest}; host RAM: {gib(est.host_bytes)} GiB; predicted "
               f"{tps:,.0f} tokens/s; trainable parameters: {est.trainable_params:,}")
    for n in notes:
        click.echo(f"note: {n}")


@main.command("k8s")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The `rayquant train` YAML config to run (mounted into the pods).")
@click.option("--image", required=True, help="Container image with Ray and rayquant[train] installed.")
@click.option("--model", default=None, help="Model id or path (default: the config's `model`).")
@click.option("--gpus", default=None, help="The cluster to plan for, e.g. 2x8xH100-80GB,4x1xA10G.")
@click.option("--inventory", type=click.Path(dir_okay=False), default=None,
              help="The cluster to plan for, as a YAML/JSON node list (see `rayquant inventory`).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="Use this plan (from `rayquant plan --json`) instead of planning.")
@click.option("--storage", required=True,
              help="Shared storage for checkpoints and the adapter: a ReadWriteMany PVC name "
                   "(mounted at /mnt/rayquant) or a URI such as s3://bucket/prefix.")
@click.option("--namespace", default="default", show_default=True, help="Kubernetes namespace.")
@click.option("--name", default=None, help="RayJob/RayCluster name (default: rayquant-<model>).")
@click.option("--hf-token-secret", default=None,
              help="Secret with the Hugging Face token, NAME or NAME:KEY (key default HF_TOKEN); "
                   "exposed to the pods as HF_TOKEN, never written into the manifest.")
@click.option("--gpu-label", default="nvidia.com/gpu.product", show_default=True,
              help="Node label that names the GPU: GPU feature discovery's, or a cloud's such as "
                   "cloud.google.com/gke-accelerator or karpenter.k8s.aws/instance-gpu-name.")
@click.option("--gpu-value", "gpu_values", multiple=True, metavar="GPU=VALUE",
              help="The --gpu-label value of a GPU where rayquant's table lacks it "
                   "(e.g. A10G=nvidia-a10g); repeatable.")
@click.option("--dataset-in-pod", default=None,
              help="The dataset's path inside the pods (on the storage or in the image); default: "
                   "the config's local dataset travels in the ConfigMap (up to 512 KiB).")
@click.option("--pip", "pip_packages", multiple=True,
              help="Package the job's runtime_env installs (runtimeEnvYAML); repeatable.")
@click.option("--cluster", is_flag=True,
              help="Render a RayCluster for interactive use instead of a RayJob.")
@click.option("--submission-mode", type=click.Choice(["K8sJobMode", "HTTPMode", "SidecarMode"]),
              default="K8sJobMode", show_default=True, help="How KubeRay submits the job.")
@click.option("--backoff-limit", type=click.IntRange(min=0), default=1, show_default=True,
              help="Retries of the whole job on a fresh cluster.")
@click.option("--deadline-hours", type=click.FloatRange(min=0, min_open=True), default=24.0,
              show_default=True, help="activeDeadlineSeconds: stop the job after this many hours.")
@click.option("--ttl-seconds", type=click.IntRange(min=0), default=600, show_default=True,
              help="Keep the finished cluster this long (ttlSecondsAfterFinished).")
@click.option("--ray-version", default=None, help="rayVersion of the cluster (default: 2.60.0).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the manifests here (atomically) instead of printing them.")
@click.option("--overwrite", is_flag=True,
              help="Replace an -o file that holds manifests rayquant rendered before (a file "
                   "rayquant did not write is never replaced).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary (worker groups, resources, entrypoint) instead of YAML.")
def k8s_command(config_path, image, model, gpus, inventory, plan_path, storage, namespace, name,
                hf_token_secret, gpu_label, gpu_values, dataset_in_pod, pip_packages, cluster,
                submission_mode, backoff_limit, deadline_hours, ttl_seconds, ray_version, output,
                overwrite, as_json) -> None:
    """Render KubeRay manifests from the plan: a ConfigMap (training config + plan) and a RayJob
    running `rayquant train` on it (a RayCluster with --cluster). One worker group per node type:
    replicas, nvidia.com/gpu, CPU and memory from the plan, a GPU node selector and toleration, and
    the rayquant.io/node-type Ray label the workers are pinned by.

    \b
    rayquant k8s --config train.yaml --gpus 2x8xH100-80GB --image ghcr.io/acme/rayquant:0.1 \\
        --storage rayquant-pvc --hf-token-secret hf-token -o rayjob.yaml
    kubectl apply -f rayjob.yaml
    """
    import json
    import os

    import yaml

    from planner.atomic import OutputExistsError, check_output
    from planner.plan import PlanError
    from rayquant import k8s
    from rayquant.config import ConfigError

    try:
        if output:
            check_output(output, overwrite=overwrite, what="manifest file")
    except OutputExistsError as e:
        raise click.ClickException(e.render(cli_spelling)) from None
    try:
        try:
            with open(config_path, encoding="utf-8") as f:
                train_config = yaml.safe_load(f)
        except OSError as e:
            raise k8s.K8sError(f"cannot read --config {config_path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise k8s.K8sError(f"--config {config_path} is not valid YAML: {e}") from None
        if not isinstance(train_config, dict):
            raise k8s.K8sError(f"--config {config_path} must hold a mapping (model, dataset, ...)")
        values = {}
        for item in gpu_values:
            gpu, sep, value = item.partition("=")
            if not sep or not gpu or not value:
                raise k8s.K8sError(f"--gpu-value {item!r} must look like GPU=VALUE, e.g. A10G=a10g")
            values[gpu] = value
        plan = k8s.plan_for(train_config, model, gpus, inventory, plan_path)
        options = k8s.K8sOptions(
            name=name or k8s.default_name(plan.model), image=image, storage=storage,
            namespace=namespace, hf_token_secret=hf_token_secret, gpu_label=gpu_label,
            gpu_values=values, cluster=cluster, dataset_in_pod=dataset_in_pod,
            ray_version=ray_version or k8s.DEFAULT_RAY_VERSION, pip=pip_packages,
            submission_mode=submission_mode, backoff_limit=backoff_limit,
            active_deadline_seconds=max(1, round(deadline_hours * 3600)),
            ttl_seconds_after_finished=ttl_seconds)
        docs = k8s.render_manifests(plan, train_config, options,
                                    config_dir=os.path.dirname(os.path.abspath(config_path)))
    except (k8s.K8sError, PlanError, ConfigError) as e:
        raise click.ClickException(str(e)) from None
    text = k8s.dump_yaml(docs)
    if output:
        write_atomically(output, text)
    summary = k8s.manifest_summary(docs)
    if as_json:
        click.echo(json.dumps({**summary, "output": output}, indent=2))
    elif output:
        click.echo(k8s.summary_text(summary) + f"\nwrote {output}; apply with: kubectl apply -f {output}")
    else:
        click.echo(text, nl=False)
    if image.startswith(("rayproject/ray:", "docker.io/rayproject/ray:")) and not pip_packages:
        click.echo(f"note: {image} has no rayquant installed; add --pip 'rayquant[train]' or build "
                   "an image (docs/kubernetes.md)", err=True)


# -- cluster: inventory --------------------------------------------------------------------------
@main.command("inventory")
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to read (e.g. ray://head:10001 or head:6379); default: RAY_ADDRESS, "
                   "else a local Ray instance. Token-auth clusters need RAY_AUTH_MODE=token and "
                   "RAY_AUTH_TOKEN (or ~/.ray/auth_token).")
@click.option("--local", "local_only", is_flag=True,
              help="Read this machine through NVML only; start no Ray.")
@click.option("--cpu-nodes/--no-cpu-nodes", "cpu_nodes", default=None,
              help="Count CPU-only nodes as CPU node types (default: only when no node has a GPU).")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON; its `nodes` rows are an inventory file for `rayquant plan --inventory`.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the inventory (JSON, or YAML for .yaml/.yml) for planning offline.")
@click.option("--overwrite", is_flag=True,
              help="Replace an -o file that holds a previous rayquant inventory (a file rayquant "
                   "did not write is never replaced).")
def inventory_command(address: str | None, local_only: bool, cpu_nodes: bool | None, as_json: bool,
                      output: str | None, overwrite: bool) -> None:
    """Show the cluster's node types: GPUs read on every node through NVML, grouped by hardware."""
    import json

    from planner.atomic import WRITTEN_BY, OutputExistsError, SIGNATURE, check_output
    from planner.plan import PlanError
    from rayquant import inventory

    if local_only and address:
        _planner_error(PlanError("--local reads this machine only; drop --address, or drop --local"))
    try:
        if output:
            check_output(output, overwrite=overwrite, what="inventory file")
    except OutputExistsError as e:
        _planner_error(e)
    try:
        if local_only:
            probes = [inventory.probe_local()]
            types = inventory.local_node_types()
            source = "local NVML"
        else:
            probes = inventory.probe_cluster(address)
            types = inventory.node_types_from_probes(probes, cpu_nodes)
            source = f"Ray cluster {address or 'at RAY_ADDRESS or local'}"
        notes = inventory.probe_notes(probes)
    except PlanError as e:
        _planner_error(e)
    if not types:
        _planner_error(PlanError("no node can host a training worker (no GPUs, and CPU-only nodes are "
                                 "left out). To fix: add GPU nodes, or pass --cpu-nodes"))
    rows = inventory.node_types_to_dicts(types)
    data = {"source": source, "nodes": rows, "notes": notes,
            "drivers": sorted({p.driver_version for p in probes if p.driver_version})}
    if output:
        if output.endswith((".yaml", ".yml")):
            import yaml

            write_atomically(output, f"# {SIGNATURE} inventory\n"
                             + yaml.safe_dump({"nodes": rows}, sort_keys=False))
        else:
            write_atomically(output, json.dumps({**WRITTEN_BY, "nodes": rows}, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    cells = [[f"{r['gpu']}:{r['gpus_per_node']}", str(r["count"]), str(r["gpus_per_node"]),
              f"{nt.gpu.memory_gib:.1f}", nt.gpu.compute_capability_str if not nt.gpu.is_cpu else "-",
              f"{r['host_memory_gib']:.0f}", str(r["cpus"] or "?")] for r, nt in zip(rows, types)]
    click.echo(f"Inventory of {source}: {sum(nt.count for nt in types)} node(s), "
               f"{sum(nt.num_gpus for nt in types if not nt.gpu.is_cpu)} GPU(s)")
    click.echo(table(["node type", "nodes", "GPUs/node", "GPU GiB", "cc", "host GiB", "CPUs"],
                     cells, right={1, 2, 3, 5, 6}))
    for line in notes:
        click.echo(f"note: {line}")
    if output:
        click.echo(f"wrote {output}; plan with: rayquant plan --model M --inventory {output}")

