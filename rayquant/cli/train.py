"""`rayquant train CONFIG.yaml`: RayQuantTrainer from a YAML config (rayquant.config)."""

from __future__ import annotations

import click

from rayquant.cli.errors import flags_then_yaml, spell_with, where_to_look

# The settings `rayquant train` takes as flags; every other setting is spelled as its YAML key.
TRAIN_FLAGS = {"output": "-o", "overwrite": "--overwrite"}


@click.command("train")
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

    from rayquant.config import load_train_config
    from rayquant.report import plan_table
    from rayquant.trainer import RayQuantTrainer

    spell_with(flags_then_yaml(TRAIN_FLAGS))
    cfg = load_train_config(config_path)
    run = dataclasses.replace(cfg.run, output_dir=output_dir) if output_dir else cfg.run
    run = dataclasses.replace(run, overwrite=True) if overwrite else run
    trainer = RayQuantTrainer(model=cfg.model, dataset=cfg.dataset, plan=cfg.plan, lora=cfg.lora,
                              sft=cfg.sft, scaling=cfg.scaling, run=run, address=address or cfg.address,
                              calibration=cfg.calibration)
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
            click.echo(plan_table(plan, flags_then_yaml(TRAIN_FLAGS)))
            click.echo(f"\nDataset {cfg.dataset}: {data.num_rows} rows, format {data.format}, all rows OK.")
            click.echo("Dry run: nothing trained. Drop --dry-run to train.")
        return
    if not as_json:
        click.echo(plan_table(trainer.plan(), flags_then_yaml(TRAIN_FLAGS)))
    where_to_look(f"Where to look: the run's checkpoints are kept under run.storage_path "
                  f"({run.storage_path}); worker logs are in Ray's session logs "
                  f"(/tmp/ray/session_latest/logs on the head node).")
    result = trainer.fit()
    if as_json:
        click.echo(json.dumps({"adapter_dir": str(result.adapter_dir), "run_dir": str(result.run_dir),
                               "manifest": result.manifest}, indent=2, default=str))
    else:
        loss = result.manifest.get("loss", {})
        click.echo(f"Loss {loss.get('first', float('nan')):.4f} -> {loss.get('last', float('nan')):.4f} "
                   f"over {result.manifest['run']['steps']} steps; adapter sha256 "
                   f"{result.manifest['adapter_sha256'][:16]}")
        click.echo(f"Adapter: {result.adapter_dir}")


COMMANDS = (train_command,)
