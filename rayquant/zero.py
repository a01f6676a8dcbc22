"""DeepSpeed ZeRO-3 for the `hf` backend: sharded placement when not even a node's GPUs hold the model.

ZeRO-3 partitions every parameter across the workers and gathers each module's weights just before
it runs. It flattens parameters into buffers of one dtype, so 4-bit weights must be *stored* in the
dtype the rest of the model uses: bitsandbytes packs the NF4 bytes into `bnb_4bit_quant_storage`
tensors (bfloat16 here) which ZeRO can shard like any other bf16 parameter. This is the ZeRO-3 + QLoRA
recipe of PEFT's docs ("DeepSpeed" -> "Use PEFT QLoRA and DeepSpeed with ZeRO3", which sets
`bnb_4bit_quant_storage=torch.bfloat16` and `torch_dtype=torch.bfloat16`) and of
`transformers.integrations.deepspeed` (HfDeepSpeedConfig fills the "auto" values from
TrainingArguments).

Unsloth does not support DeepSpeed, so ZeRO-3 plans use the `hf` backend (transformers + PEFT +
bitsandbytes). The plan checks and configs are plain data; deepspeed itself is imported by
transformers' Trainer, and here only by `partition_quantized_model` (a 4-bit base's shards) and
`gathered_trainable_state_dict` (saving the adapter).

In a Ray Train worker (rayquant.worker) a zero3 node plan means: the SFTConfig carries
`deepspeed=zero3_config(node_plan)` and is built before the model loads; the base loads with
`BitsAndBytesConfig(**bnb_config_kwargs(node_plan))` into host RAM and is partitioned over the ranks
before LoRA is added (`partition_quantized_model`); DDP's settings do not apply;
every rank gathers the LoRA shards and saves the whole adapter, so the driver's hash check holds.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Mapping

from planner.plan import NodePlan, PlanError, TrainingPlan
from planner.search.policy import ZERO3_QUANTIZATIONS

# DeepSpeed's own optimizers do not include bitsandbytes' 8-bit AdamW; ZeRO accepts a client
# optimizer only with `zero_allow_untested_optimizer` (deepspeed/runtime/engine.py).
_BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


def zero3_problems(plan: TrainingPlan) -> list[str]:
    """What keeps this plan's ZeRO-3 node plans from running as one ZeRO-3 group (empty: fine)."""
    zero = [p for p in plan.node_plans if p.placement == "zero3"]
    if not zero:
        return []
    problems = []
    if len(zero) != len(plan.node_plans):
        problems.append("ZeRO-3 shards parameters across every worker, so every node type of the plan "
                        "must use placement zero3 (mixed with per-gpu/node-spanning here)")
    for p in zero:
        if p.backend != "hf":
            problems.append(f"{p.node_type}: ZeRO-3 needs backend 'hf' (Unsloth does not run under "
                            f"DeepSpeed), plan says {p.backend!r}")
        if p.quantization not in ZERO3_QUANTIZATIONS:
            problems.append(f"{p.node_type}: quantization {p.quantization!r} cannot be sharded by "
                            f"ZeRO-3; use one of {', '.join(ZERO3_QUANTIZATIONS)}")
    # Every rank gathers the same modules in the same order and DeepSpeed averages gradients over
    # ranks, so the ranks must take the same micro-batches and accumulation (no token weighting).
    shapes = {(p.micro_batch_size, p.gradient_accumulation_steps, p.compute_dtype) for p in zero}
    if len(shapes) > 1:
        problems.append("ZeRO-3 node types must share micro-batch, accumulation and compute dtype, got "
                        + ", ".join(f"{p.node_type}: {p.micro_batch_size}x{p.gradient_accumulation_steps}"
                                    f" {p.compute_dtype}" for p in zero))
    return problems


def check_zero3_plan(plan: TrainingPlan) -> None:
    problems = zero3_problems(plan)
    if problems:
        raise PlanError("this ZeRO-3 plan cannot run:\n  - " + "\n  - ".join(problems)
                        + "\nTo fix: re-plan with `rayquant plan --backend hf`.")


def quant_storage_dtype(node_plan: NodePlan) -> str:
    """The dtype 4-bit weights are packed into: the model's dtype, so ZeRO flattens one dtype."""
    return node_plan.compute_dtype


def bnb_config_kwargs(node_plan: NodePlan) -> dict[str, Any] | None:
    """Keyword arguments for `transformers.BitsAndBytesConfig` under ZeRO-3 (None: 16-bit weights).

    Dtypes are names ("bfloat16"), which BitsAndBytesConfig accepts as they are; load the model with
    the same `dtype` and no device_map (DeepSpeed places the shards).
    """
    if node_plan.quantization not in ("nf4", "dynamic-4bit"):
        return None
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": node_plan.double_quant,
        "bnb_4bit_compute_dtype": node_plan.compute_dtype,
        "bnb_4bit_quant_storage": quant_storage_dtype(node_plan),
    }


def zero3_config(node_plan: NodePlan, offload_optimizer: bool = False,
                 offload_params: bool = False) -> dict[str, Any]:
    """The DeepSpeed config (for `TrainingArguments(deepspeed=...)`) of a zero3 node plan.

    Batch sizes, accumulation and clipping are "auto": transformers' HfTrainerDeepSpeedConfig fills
    them from TrainingArguments, which the worker builds from the same node plan, so they cannot
    disagree. `offload_optimizer` / `offload_params` move the shards to host RAM (ZeRO-Infinity's
    CPU offload) when the planner's host-memory budget allows.
    """
    if node_plan.placement != "zero3":
        raise PlanError(f"{node_plan.node_type} has placement {node_plan.placement!r}, not zero3; "
                        f"DeepSpeed is only used for sharded placement")
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        # Saving gathers the 16-bit weights on rank 0; PEFT saves only the adapter, which is small.
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": node_plan.compute_dtype == "bfloat16"},
        "fp16": {"enabled": node_plan.compute_dtype == "float16"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,  # the worker reports progress through Ray; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if node_plan.optimizer in _BNB_OPTIMIZERS:
        config["zero_allow_untested_optimizer"] = True
    return config


@contextmanager
def zero3_suspended():
    """transformers' ZeRO-3 switch off for a while: a 4-bit base then loads into host RAM with
    `device_map={"": "cpu"}` (refused while ZeRO-3 is on). Quantized models are never built under
    zero.Init anyway, so the device is the only difference. The TrainingArguments' DeepSpeed config
    is back on afterwards."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def partition_quantized_model(model) -> dict[str, int]:
    """Partition a 4-bit base loaded whole into host RAM over the ZeRO-3 ranks, one parameter at a
    time, before the DeepSpeed engine sees it. Call with the DeepSpeed config active (the
    TrainingArguments built first) and before adding LoRA.

    transformers builds quantized models without zero.Init (modeling_utils.py get_init_context:
    zero.Init only `if not is_quantized`), and bitsandbytes' quantizer puts a model loaded without
    a device_map on the current GPU (quantizer_bnb_4bit.py update_device_map), so every rank would
    first hold the whole 4-bit base on its GPU; the engine then moves a module that is not
    zero-initialized to the device whole (deepspeed/runtime/engine.py _configure_distributed_model)
    before partitioning it. A 70B base is ~40 GB in 4-bit: more than a 24 GB GPU. Loaded on the CPU
    instead (zero3_suspended), `Init(module=...)` moves each parameter alone to the device and keeps
    this rank's shard of it (partition_parameters.py _convert_to_zero_parameters), and the engine
    leaves a partitioned module where it is. QuantStates and buffers are no parameters: they follow
    here. Not yet run on a GPU (the CPU tests cover the same calls with the CPU as the device).
    Returns what this rank now holds: `zero3_base_bytes` (every base parameter whole) and
    `zero3_shard_bytes` (its shards of them), for the manifest.
    """
    import bitsandbytes as bnb
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations.deepspeed import deepspeed_config

    # deepspeed.comm over the process group Ray Train set up (the engine would do it later; the
    # config's batch check needs the world size now).
    deepspeed.init_distributed()
    deepspeed.zero.Init(module=model, config_dict_or_path=deepspeed_config())
    device = torch.device(get_accelerator().current_device_name())
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight.quant_state.to(device)  # in place
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    params = list(model.parameters())
    return {"zero3_base_bytes": sum(p.ds_numel * p.ds_tensor.element_size() for p in params),
            "zero3_shard_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)}


def gathered_trainable_state_dict(model) -> dict[str, Any]:
    """The trainable (LoRA) parameters of a ZeRO-3 model, whole, on every rank, by parameter name.

    ZeRO-3 leaves each rank a shard (`param.ds_tensor`) and an empty `param.data`, so PEFT's
    `save_pretrained` would write empty tensors. Transformers' own `save_model` consolidates on rank
    0 only; here every rank all-gathers the adapter (a collective: all ranks call it, parameters in
    the same order; `modifier_rank=None` as nothing is written back), so each rank saves the full
    adapter and the driver can check that the ranks' hashes agree. Pass the result to
    `PeftModel.save_pretrained(dir, state_dict=...)`.
    """
    import deepspeed

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {name: p.detach().clone().cpu() for name, p in named}
