"""`rayquant export ADAPTER_DIR --merged OUT`: a trained adapter merged into a 16-bit copy of its base
(rayquant.export)."""

from __future__ import annotations

import click

from rayquant.cli.errors import where_to_look


@click.command("export")
@click.argument("adapter_dir", metavar="ADAPTER_DIR", type=click.Path(file_okay=False))
@click.option("--merged", "out", required=True, type=click.Path(file_okay=False),
              help="Directory for the merged model: transformers' config and safetensors weights, "
                   "the tokenizer, and rayquant_export.json (the adapter's SHA-256, the check).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16"]), default="bf16", show_default=True,
              help="Precision of the merged weights (the base is loaded in it, whatever the run "
                   "trained on: merging into 4-bit or FP8 weights would keep their rounding).")
@click.option("--base", default=None,
              help="The base model (default: the model in the adapter's manifest.json).")
@click.option("--device", default="cpu", show_default=True,
              help="Where to merge: cpu, or a CUDA device (cuda, cuda:1) when the base fits one.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it holds a previous rayquant export (a folder rayquant did not "
                   "write is never replaced).")
@click.option("--json", "as_json", is_flag=True, help="Print what rayquant_export.json holds as JSON.")
def export_command(adapter_dir: str, out: str, dtype: str, base: str | None, device: str,
                   overwrite: bool, as_json: bool) -> None:
    """Merge a LoRA adapter written by `rayquant train` into a 16-bit copy of its base model and
    write a standard transformers model directory with the tokenizer. The merged model's logits are
    checked against base + adapter on a few tokens before anything is written.

    \b
    rayquant export ~/rayquant_runs/quickstart/adapter --merged merged-quickstart
    rayquant export ADAPTER_DIR --merged OUT --dtype fp16
    """
    import json

    from rayquant import quiet
    from rayquant.export import export_merged

    where_to_look("The merged model was not written: the adapter directory is unchanged.")
    # Known library noise filtered; with --json all but the document goes to stderr.
    stdout = click.get_current_context().with_resource(quiet.console(json=as_json))
    info = export_merged(adapter_dir, out, dtype=dtype, base=base, overwrite=overwrite, device=device)
    if as_json:
        click.echo(json.dumps(dict(info, out=str(out)), indent=2), file=stdout)
        return
    check = info["check"]
    click.echo(f"Merged {info['adapter_dir']} (sha256 {info['adapter_sha256'][:16]}) into {info['base_model']} "
               f"in {info['dtype']}.")
    click.echo(f"Check: logits of the merged model match base + adapter on {check['tokens']} tokens "
               f"(max difference {check['max_abs_logit_diff']:.3g}, {check['relative']:.2%} of the largest "
               f"logit; {dtype} allows {check['tolerance']:.0%}).")
    click.echo(f"Model: {out}")


COMMANDS = (export_command,)
