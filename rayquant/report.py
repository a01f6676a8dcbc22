"""Text and plot renderings of plans, estimates and catalogs for the CLI (no heavy imports;
matplotlib only inside plot_plan)."""

from __future__ import annotations

import dataclasses
import math

from planner.hardware import CPU_DEVICE, GIB
from planner.throughput import expected_error_text
from planner.plan import MemoryBreakdown

TERMS = tuple(f.name for f in dataclasses.fields(MemoryBreakdown))


def gib(n_bytes: float, digits: int = 2) -> str:
    """Bytes as GiB with `digits` decimals; a small value keeps two significant digits instead of
    rounding to zero (a tiny model's 3 MB reads 0.0029, not 0.00)."""
    value = n_bytes / GIB
    if value == 0 or abs(value) >= 10 ** -digits * 10:
        return f"{value:.{digits}f}"
    return f"{value:.{max(digits, 1 - math.floor(math.log10(abs(value))))}f}"


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Plain-text table (the gpus/models listings); columns in `right` are right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plan_table(plan, spell=None) -> str:
    """The human-readable plan: choices, memory breakdown and reasons per node type."""
    job = plan.job
    if all(p.gpu == CPU_DEVICE for p in plan.node_plans):
        # The throughput model's constants and error come from GPU runs only.
        error = "a GPU model's figure: CPU workers train far slower"
    else:
        error = (f"{expected_error_text()}: the model's median error on measured runs; "
                 "`rayquant calibrate` measures a GPU type")
    lines = [f"Plan for {plan.model}: {plan.num_workers} worker(s), global batch "
             f"{plan.global_batch_size} x {job.seq_len} tokens, safety margin {job.safety_margin:.0%}",
             f"Predicted throughput: {plan.tokens_per_second:,.0f} tokens/s ({error})", ""]
    heads = ["node type", "nodes", "workers", "quant", "micro", "accum", "optimizer", "ckpt",
             "placement", "peak/budget GiB", "tok/s/worker"]
    rows = [[p.node_type, p.nodes, p.num_workers, p.quantization, p.micro_batch_size,
             p.gradient_accumulation_steps, p.optimizer, p.gradient_checkpointing, p.placement,
             f"{gib(p.peak_memory_bytes, 1)}/{gib(p.memory_budget_bytes, 1)}",
             f"{p.tokens_per_second:,.0f}"] for p in plan.node_plans]
    lines.append(table(heads, rows, right={1, 2, 4, 5, 9, 10}))
    terms = list(TERMS)
    rows = [[p.node_type] + [gib(getattr(p.breakdown, t)) for t in terms]
            + [gib(p.host_memory_bytes, 1)] for p in plan.node_plans]
    lines += ["", "Memory per worker (GiB, busiest GPU):",
              table(["node type"] + terms + ["host"], rows, right=set(range(1, 9)))]
    lines += ["", "Why:"]
    for p in plan.node_plans:
        lines.append(f"  {p.node_type}")
        lines += [f"    {k}: {v}" for k, v in p.reasons.items()]
    if plan.warnings:
        from planner.vocab import render_settings

        # Warnings name settings neutrally ({global_batch_size}); each face spells them its way.
        lines += ["", "Warnings:"] + [f"  - {render_settings(w, spell)}" for w in plan.warnings]
    return "\n".join(lines)


def plot_plan(plan, path: str) -> None:
    """Each node type's memory breakdown as a stacked bar against its GPU's capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = list(TERMS)
    names = [p.node_type for p in plan.node_plans]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 4.5))
    bottoms = [0.0] * len(names)
    for term in terms:
        values = [getattr(p.breakdown, term) / GIB for p in plan.node_plans]
        ax.bar(names, values, bottom=bottoms, label=term)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, p in enumerate(plan.node_plans):
        capacity = p.memory_budget_bytes / (1 - plan.job.safety_margin) / GIB
        ax.hlines(capacity, i - 0.4, i + 0.4, colors="black", label="GPU memory" if i == 0 else None)
        ax.hlines(p.memory_budget_bytes / GIB, i - 0.4, i + 0.4, colors="red", linestyles="dashed",
                  label="budget (margin)" if i == 0 else None)
    ax.set_ylabel("GiB per GPU (busiest)")
    ax.set_title(f"{plan.model}: predicted peak memory per worker")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path)


def estimate_text(result: dict) -> str:
    """`rayquant estimate`'s table: one configuration's memory terms, whether it fits, the longest
    sequence, tokens/s (from rayquant.planning.estimate's result)."""
    cfg = result["config"]
    gpu_gib = result["gpu_memory_bytes"] / GIB
    rows = [[k, gib(v)] for k, v in result["breakdown_bytes"].items()]
    rows.append(["peak", gib(result["predicted_peak_memory_bytes"])])
    lines = [f"{result['model']} on {result['gpu']} ({gpu_gib:.1f} GiB): {cfg['quantization']}, "
             f"seq {cfg['seq_len']} x micro-batch {cfg['micro_batch_size']}, "
             f"{cfg['gradient_checkpointing']} checkpointing, {cfg['optimizer']}, {cfg['backend']} backend",
             table(["term", "GiB"], rows, right={1}),
             f"\nfits: {'yes' if result['fits'] else 'NO'} ({gib(result['peak_memory_bytes'])} of "
             f"{gpu_gib:.2f} GiB); longest sequence that fits at micro-batch {cfg['micro_batch_size']}: "
             f"{result['max_seq_len']}; host RAM: {gib(result['host_memory_bytes'])} GiB; predicted "
             f"{result['tokens_per_second']:,.0f} tokens/s "
             f"({expected_error_text(result.get('tokens_per_second_error'))}); trainable parameters: "
             f"{result['trainable_params']:,}"]
    prot = result.get("protected")
    if prot is not None:
        lines.append(_protected_text(prot))
    return "\n".join(lines + [f"note: {n}" for n in result["notes"]])


def _protected_text(prot: dict) -> str:
    """Dynamic 4-bit's protected modules: the edge layers' by name, the rest summed (which ones the
    worker picks by their measured NF4 error)."""
    edges = [m for m in prot["modules"] if m["why"].endswith("decoder layer")]
    head = (f"\nprotected 16-bit modules: {len(prot['modules'])} of {prot['candidates']}, "
            f"{gib(prot['cost_bytes'])} GiB (in `weights` and the peak) of {gib(prot['budget_bytes'])} "
            "GiB left free under the safety margin")
    rows = [[m["name"], m["why"], f"{m['bytes'] / 2**20:,.1f}"] for m in edges]
    picked = prot["picked_by_error"]
    if picked["count"]:
        rows.append([f"{picked['count']} more modules", "picked by measured NF4 error when the worker loads",
                     f"{picked['bytes'] / 2**20:,.1f}"])
    return head + ("\n" + table(["module", "why", "MiB"], rows, right={2}) if rows else "")


def compare_text(result: dict) -> str:
    """`rayquant estimate --compare`'s table: one row per quantization and backend."""
    cfg = result["config"]
    gpu_gib = result["gpu_memory_bytes"] / GIB
    rows = []
    for r in result["rows"]:
        if not r["available"]:
            rows.append([r["quantization"], r["backend"], "-", "-", "-", "-", "-", r["reason"]])
            continue
        rows.append([r["quantization"], r["backend"], gib(r["peak_memory_bytes"]),
                     "yes" if r["fits"] else "NO", f"{r['max_seq_len']:,}", f"{r['tokens_per_second']:,.0f}",
                     gib(r["host_memory_bytes"]),
                     f"protects {gib(r['protected_bytes'])} GiB" if r["protected_bytes"] else ""])
    head = (f"{result['model']} on {result['gpu']} ({gpu_gib:.1f} GiB): seq {cfg['seq_len']} x micro-batch "
            f"{cfg['micro_batch_size']}, LoRA rank {cfg['lora_rank']}, {cfg['optimizer']}; each backend with "
            "its own checkpointing (unsloth: offload to host RAM, hf: torch's)")
    return "\n".join([head, table(["quantization", "backend", "peak GiB", "fits", "longest seq",
                                    "tokens/s", "host GiB", "note"], rows, right={2, 4, 5, 6})])


def plot_compare(result: dict, path: str) -> None:
    """Peak memory per quantization, one bar per backend, against the GPU's memory; each bar
    labelled with the longest sequence that fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quants = list(dict.fromkeys(r["quantization"] for r in result["rows"]))
    backends = list(dict.fromkeys(r["backend"] for r in result["rows"]))
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(quants) + 2), 4.5))
    for j, backend in enumerate(backends):
        for i, q in enumerate(quants):
            (r,) = [r for r in result["rows"] if r["quantization"] == q and r["backend"] == backend]
            x = i + (j - (len(backends) - 1) / 2) * width
            if not r["available"]:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7)
                continue
            bar = ax.bar(x, r["peak_memory_bytes"] / GIB, width, color=f"C{j}",
                         label=backend if i == 0 or not ax.get_legend_handles_labels()[1].count(backend) else None)
            ax.bar_label(bar, labels=[f"{r['max_seq_len']:,}"], fontsize=7, rotation=90, padding=2)
    ax.axhline(result["gpu_memory_bytes"] / GIB, color="black", linestyle="--", label="GPU memory")
    ax.set_xticks(range(len(quants)), quants)
    ax.set_ylabel("predicted peak GiB per worker")
    ax.set_title(f"{result['model']} on {result['gpu']}, seq {result['config']['seq_len']} "
                 "(bar labels: longest sequence that fits)", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    """Write a matplotlib figure atomically, signed in its metadata (a later --plot tells its own
    plot from a user's file by it), and close it."""
    import matplotlib.pyplot as plt

    from planner.atomic import SIGNATURE, write_atomically

    meta = {"Creator": SIGNATURE} if str(path).lower().endswith(".svg") else {"Software": SIGNATURE}
    try:
        write_atomically(path, write=lambda tmp: fig.savefig(tmp, metadata=meta))
    finally:
        plt.close(fig)
