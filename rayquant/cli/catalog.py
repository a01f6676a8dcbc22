"""`rayquant gpus` and `rayquant models`: the planner's GPU and model catalogs."""

from __future__ import annotations

import click

from rayquant.report import table


@click.command("gpus")
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


@click.command("models")
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
        raise click.BadParameter(f"no catalog model matches {filter_text!r}. To fix: run `rayquant "
                                 "models` without --filter to see them all", param_hint="--filter")

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


COMMANDS = (gpus_command, models_command)
