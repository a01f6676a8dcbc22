"""`rayquant train CONFIG.yaml`: RayQuantTrainer from a YAML config (rayquant.config)."""

from __future__ import annotations

import click

from rayquant.cli.errors import flags_then_yaml, spell_with, where_to_look

# The settings `rayquant train` takes as flags; every other setting is spelled as its YAML key.
TRAIN_FLAGS = {"output": "-o", "overwrite": "--overwrite", "resume_anyway": "--resume-anyway"}
INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C


@click.command("train")
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True,
              help="Check everything that can be checked before Ray starts (the config; every "
                   "dataset row, tokenized with the model's tokenizer at sft.seq_len; the model, "
                   "tokenizer and weights resolvable; the batch against the rows; host RAM), print "
                   "the plan and exit (loads no weights, starts no Ray).")
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for the adapter and manifest.json (default: "
                   "<run.storage_path>/<run.name>/adapter).")
@click.option("--overwrite", is_flag=True,
              help="Replace the output directory if it holds a previous rayquant adapter (a folder "
                   "rayquant did not write is never replaced).")
@click.option("--resume-anyway", is_flag=True,
              help="Resume an unfinished run of this run.name although its settings changed in a way "
                   "that keeps the trained steps valid (max_steps going up); other changes are "
                   "refused whatever this says (also run.resume_anyway).")
@click.option("--address", default=None,
              help="Ray address, overriding the config's (default: RAY_ADDRESS, else a local cluster).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the plan (with --dry-run) or the result (adapter, manifest) as JSON.")
def train_command(config_path: str, dry_run: bool, output_dir: str | None, overwrite: bool,
                  resume_anyway: bool, address: str | None, as_json: bool) -> None:
    """Fine-tune with LoRA/QLoRA on Ray as a YAML config says: plan, train on Ray Train workers
    (Unsloth + TRL), gather one adapter plus manifest.json. The YAML schema is documented in
    rayquant/config.py; examples/quickstart.yaml is a complete example.

    \b
    rayquant train examples/quickstart.yaml --dry-run   # plan + data check only
    rayquant train examples/quickstart.yaml             # train; prints progress and the adapter path
    """
    import dataclasses
    import json

    from rayquant import quiet
    from rayquant.config import load_train_config, render_options
    from rayquant.report import plan_table
    from rayquant.trainer import RayQuantTrainer

    spell_with(flags_then_yaml(TRAIN_FLAGS))
    # Known library noise filtered; with --json all but the document goes to stderr.
    stdout = click.get_current_context().with_resource(quiet.console(json=as_json))
    cfg = load_train_config(config_path)
    run = dataclasses.replace(cfg.run, output_dir=output_dir) if output_dir else cfg.run
    run = dataclasses.replace(run, overwrite=True) if overwrite else run
    run = dataclasses.replace(run, resume_anyway=True) if resume_anyway else run
    trainer = RayQuantTrainer(model=cfg.model, dataset=cfg.dataset, plan=cfg.plan, lora=cfg.lora,
                              sft=cfg.sft, scaling=cfg.scaling, run=run, address=address or cfg.address,
                              calibration=cfg.calibration, dataset_split=cfg.dataset_split,
                              dataset_subset=cfg.dataset_subset, eval_dataset=cfg.eval_dataset,
                              eval_dataset_split=cfg.eval_dataset_split,
                              eval_dataset_subset=cfg.eval_dataset_subset)
    if dry_run:
        if run.output_dir:
            from rayquant.adapters import check_adapter_output

            check_adapter_output(run.output_dir, run.overwrite)
        checked = trainer.check()
        spell = flags_then_yaml(TRAIN_FLAGS)
        warnings = [render_options(w, spell) for w in checked.warnings]
        if as_json:
            summary = checked.data_summary()
            click.echo(json.dumps({"plan": checked.plan.to_dict(), "dataset": {
                "path": cfg.dataset, "rows": checked.data.num_rows, "format": checked.data.format,
                **summary}, "model": dataclasses.asdict(checked.model), "steps": checked.total_steps,
                "report_to": list(checked.report_to), "warnings": warnings}, indent=2), file=stdout)
        else:
            click.echo(plan_table(checked.plan, spell))
            click.echo("")
            for line in dry_run_lines(checked, cfg.dataset):
                click.echo(line)
            for w in warnings:
                click.echo(f"Warning: {w}")
            click.echo("Dry run: nothing trained. Drop --dry-run to train.")
        return
    if not as_json:
        click.echo(plan_table(trainer.plan(), flags_then_yaml(TRAIN_FLAGS)))
    where_to_look(f"Where to look: the run's checkpoints are kept under run.storage_path "
                  f"({run.storage_path}); worker logs are in Ray's session logs "
                  f"(/tmp/ray/session_latest/logs on the head node).")
    from rayquant.trainer import RunInterrupted

    try:
        result = trainer.fit()
    except RunInterrupted as stop:  # Ctrl-C: where the run stopped and how to resume it, no traceback
        click.echo(f"[rayquant] {stop.render(flags_then_yaml(TRAIN_FLAGS))}", err=True)
        click.get_current_context().exit(INTERRUPTED)
    except KeyboardInterrupt:  # before Ray Train started
        click.echo("[rayquant] interrupted before training started; nothing was trained.", err=True)
        click.get_current_context().exit(INTERRUPTED)
    if as_json:
        import ray

        ray.shutdown()  # Ray prints the worker lines it held back (deduplication) now, to stderr
        click.echo(json.dumps({"adapter_dir": str(result.adapter_dir), "run_dir": str(result.run_dir),
                               "manifest": result.manifest}, indent=2, default=str), file=stdout)
    else:
        loss = result.manifest.get("loss", {})
        click.echo(f"Loss {loss.get('first', float('nan')):.4f} -> {loss.get('last', float('nan')):.4f} "
                   f"over {result.manifest['run']['steps']} steps; adapter sha256 "
                   f"{result.manifest['adapter_sha256'][:16]}")
        click.echo(f"Adapter: {result.adapter_dir}")


def dry_run_lines(checked, dataset: str) -> list[str]:
    """What `--dry-run` found, in words: the rows, what they tokenize to, evaluation, steps."""
    tokens, data = checked.tokens, checked.data
    left = len(tokens.dropped)
    lines = [f"Dataset {dataset}: {data.num_rows} rows, format {data.format}, "
             + ("all rows OK." if not left else f"{left} of them train nothing (see the warning below).")]
    lines.append(f"Tokenized with {checked.model.model}'s tokenizer at sft.seq_len {tokens.seq_len}: "
                 f"{tokens.rows - left} rows train, {len(tokens.truncated)} cut at sft.seq_len, "
                 f"{tokens.trainable_tokens:,} trainable tokens of {tokens.tokens:,}"
                 + (f"; packed into {tokens.num_rows} rows" if tokens.packed else "") + ".")
    if checked.eval_tokens is not None:
        e = checked.eval_tokens
        lines.append(f"Evaluation: {checked.eval_data.num_rows} rows of {checked.eval_data.source}, "
                     f"{e.trainable_tokens:,} tokens scored.")
    lines.append(f"Model {checked.model.model}: weights {checked.model.weights}"
                 + (f"; context {checked.model.context_length} tokens" if checked.model.context_length else "")
                 + f". {checked.total_steps} steps of {checked.plan.global_batch_size} "
                 + ("packed rows." if tokens.packed else "rows."))
    return lines


COMMANDS = (train_command,)
