"""`rayquant inventory`: the node types of a live Ray cluster or of this machine (rayquant.inventory)."""

from __future__ import annotations

import click


@click.command("inventory")
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to read (e.g. ray://head:10001, head:6379, or auto for a cluster "
                   "started on this machine); default: RAY_ADDRESS, else a new local Ray instance. "
                   "Token-auth clusters need RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                   "~/.ray/auth_token).")
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

    from planner.atomic import SIGNATURE, WRITTEN_BY, check_output, write_atomically
    from rayquant import inventory, quiet
    from rayquant.report import table

    if local_only and address:
        raise click.UsageError("--local reads this machine only. To fix: drop --address, or drop --local")
    if output:
        check_output(output, overwrite=overwrite, what="inventory file")
    # Known library noise filtered; with --json all but the document goes to stderr.
    stdout = click.get_current_context().with_resource(quiet.console(json=as_json))
    if local_only:
        probes = [inventory.probe_local()]
        types = inventory.local_node_types()
        source = "local NVML"
    else:
        probes = inventory.probe_cluster(address)
        types = inventory.node_types_from_probes(probes, cpu_nodes)
        source = f"Ray cluster {address or 'at RAY_ADDRESS or local'}"
    notes = inventory.probe_notes(probes)
    if not types:
        raise inventory.InventoryError("no node can host a training worker (no GPUs, and CPU-only "
                                       "nodes are left out). To fix: add GPU nodes, or pass --cpu-nodes")
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
        click.echo(json.dumps(data, indent=2), file=stdout)
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


COMMANDS = (inventory_command,)
