"""Load a base model as one NodePlan says (4-bit NF4 / FP8 / 16-bit, Unsloth or plain HF) and put
LoRA on it. One function, branching on the plan's backend and quantization; it reports what really
ran (Unsloth's CPU fallback, for one, may load 16-bit where 4-bit cannot run).
"""

from __future__ import annotations

from typing import Any, Mapping

from planner.plan import JobSpec, NodePlan
from rayquant.contract import QuantizationReport

_CHECKPOINTING = {"none": False, "hf": True, "unsloth": "unsloth"}
_FOUR_BIT = ("nf4", "dynamic-4bit")


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _lora_targets(job: JobSpec) -> Any:
    return "all-linear" if tuple(job.lora_targets) == ("all",) else list(job.lora_targets)


def describe_loaded(model) -> dict[str, Any]:
    """What was actually built: 4-bit layers present, parameter counts, dtype of the adapters."""
    import bitsandbytes as bnb

    four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "linear4bit_modules": four_bit,
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
        # ds_numel: a ZeRO-3 parameter's whole size (its local tensor is empty or a shard).
        "total_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
        "adapter_dtype": str(trainable[0].dtype).replace("torch.", "") if trainable else None,
    }


def quantized_module_counts(model) -> dict[str, int]:
    """How many base linears of `model` are NF4 (bitsandbytes Linear4bit) and row-wise FP8 now.

    The worker records it after training as well as after loading: the scheme each rank trained
    with, not only the one it loaded (a fallback or a wrapper that swapped layers would show here).
    """
    import bitsandbytes as bnb

    from rayquant.fp8 import Fp8RowwiseLinear

    return {"linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
            "fp8_rowwise": sum(isinstance(m, Fp8RowwiseLinear) for m in model.modules())}


# What load_for_training's info holds about the scheme it applied (here, fp8.after_load and
# dynamic4bit.after_load) that the manifest shows; a key absent did not apply to the scheme.
_QUANTIZATION_DETAILS = ("linear4bit_modules", "fp8_path", "fp8_modules", "fp8_weight_bytes",
                         "protected_modules", "protected_cost_bytes", "protected_budget_bytes",
                         "protected_weight_bytes", "protected_restored_after_load", "candidates",
                         "zero3_base_bytes", "zero3_shard_bytes")


def quantization_report(info: Mapping[str, Any], modules_after_training: Mapping[str, int]) -> QuantizationReport:
    """One worker's quantization for the manifest, from load_for_training's info: planned and used
    scheme, the scheme's details (FP8 modules and bytes; dynamic 4-bit's protected modules, why
    each, their cost and budget), and the quantized layers (quantized_module_counts) its base held
    when training ended."""
    details = {k: info[k] for k in _QUANTIZATION_DETAILS if k in info}
    if "reasons" in info:
        details["protected_reasons"] = info["reasons"]
    return QuantizationReport(planned=info["quantization_planned"], used=info["quantization_used"],
                              details=details, modules_after_training=modules_after_training)


def load_for_training(model_path: str, node_plan: NodePlan, job: JobSpec, *,
                      device_map: Mapping[str, Any], seed: int = 0):
    """Return (peft model, tokenizer, info) for one worker.

    `device_map` is always a dict (module -> device): under DDP a string map makes Unsloth place
    quantized weights on `cuda:<global rank>` and accelerate refuse the model. ZeRO-3 node plans
    ignore it (DeepSpeed places the shards); build the TrainingArguments with the DeepSpeed config
    before calling this, so transformers loads the model the ZeRO-3 way.
    """
    if not isinstance(device_map, Mapping):
        raise TypeError(f"device_map must be a dict (module -> device), got {device_map!r}")
    # dynamic-4bit: the modules kept 16-bit within the plan's budget, chosen by measured NF4 error
    # (rayquant/dynamic4bit.py); their list and cost go into `info` and so into the manifest.
    from rayquant.dynamic4bit import protection_for_plan

    protection = protection_for_plan(model_path, node_plan)
    quant_info: dict[str, Any] = {}
    if node_plan.backend == "unsloth":
        model, tokenizer = _load_unsloth(model_path, node_plan, job, dict(device_map), seed,
                                         protection, quant_info)
    else:
        model, tokenizer = _load_hf(model_path, node_plan, job, dict(device_map), seed,
                                    protection, quant_info)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = {"backend": node_plan.backend, "quantization_planned": node_plan.quantization,
            "compute_dtype": node_plan.compute_dtype,
            "gradient_checkpointing": node_plan.gradient_checkpointing, **describe_loaded(model),
            **quant_info}
    if node_plan.quantization in _FOUR_BIT and info["linear4bit_modules"] == 0:
        info["quantization_used"] = "16-bit (4-bit unavailable on this device)"
    else:
        info["quantization_used"] = node_plan.quantization
    return model, tokenizer, info


def _load_unsloth(model_path, node_plan, job, device_map, seed, protection, quant_info):
    from unsloth import FastLanguageModel

    from rayquant import dynamic4bit, fp8

    q = node_plan.quantization
    kwargs: dict[str, Any] = dict(
        max_seq_length=job.seq_len, dtype=_dtype(node_plan.compute_dtype),
        load_in_4bit=q in _FOUR_BIT, load_in_16bit=q in ("bf16", "fp16"), device_map=device_map,
        use_gradient_checkpointing=_CHECKPOINTING[node_plan.gradient_checkpointing],
        random_state=seed,
    )
    if q == "fp8" and node_plan.fp8_path == "rowwise":  # cc 8.9: 16-bit load, then rayquant.fp8
        kwargs["load_in_16bit"] = True
    elif q == "fp8":
        kwargs["load_in_fp8"] = True
    if protection is not None:
        kwargs["quantization_config"] = dynamic4bit.bnb_quantization_config(
            protection.protected, kwargs["dtype"], node_plan.double_quant)
    model, tokenizer = FastLanguageModel.from_pretrained(model_path, **kwargs)
    quant_info.update(dynamic4bit.after_load(model, model_path, protection))
    quant_info.update(fp8.after_load(model, node_plan))
    model = FastLanguageModel.get_peft_model(
        model, r=job.lora_rank, lora_alpha=job.effective_lora_alpha, lora_dropout=job.lora_dropout,
        target_modules=_lora_targets(job), bias="none",
        use_gradient_checkpointing=_CHECKPOINTING[node_plan.gradient_checkpointing], random_state=seed,
    )
    return model, tokenizer


def _load_hf(model_path, node_plan, job, device_map, seed, protection, quant_info):
    """transformers + bitsandbytes + PEFT, for architectures Unsloth does not support."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = _dtype(node_plan.compute_dtype)
    zero3 = node_plan.placement == "zero3"
    quant = None
    if zero3:
        from rayquant.zero import bnb_config_kwargs

        # NF4 packed into compute-dtype storage, so ZeRO-3 shards it like any 16-bit weight. A 16-bit
        # base loads under zero.Init with no device_map; a 4-bit one loads whole into host RAM and is
        # partitioned below (rayquant.zero.partition_quantized_model), never whole on a GPU.
        kwargs = bnb_config_kwargs(node_plan)
        device_map = None
        if kwargs is not None:
            kwargs["llm_int8_skip_modules"] = ["lm_head", *(protection.protected if protection else ())]
            quant = BitsAndBytesConfig(**kwargs)
    elif node_plan.quantization in _FOUR_BIT:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=node_plan.double_quant,
                                   bnb_4bit_compute_dtype=dtype,
                                   llm_int8_skip_modules=["lm_head", *(protection.protected if protection else ())])
    elif node_plan.quantization == "fp8":
        raise ValueError("the hf backend has no FP8 path; plan FP8 with backend=unsloth, or pin "
                         "quantization to nf4/bf16")
    if zero3 and quant is not None:
        from rayquant.zero import zero3_suspended

        # transformers refuses a device_map under ZeRO-3 and would put the whole base on the GPU.
        with zero3_suspended():
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": "cpu"},
                                                         quantization_config=quant)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=device_map,
                                                     quantization_config=quant)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="right")
    use_ckpt = node_plan.gradient_checkpointing != "none"
    if quant is not None and not zero3:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_ckpt)
    elif use_ckpt:
        # Under ZeRO-3 too: prepare_model_for_kbit_training would upcast the 16-bit weights to
        # fp32 beside the bf16-stored 4-bit ones (TRL skips it for sharded QLoRA as well).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    from rayquant.dynamic4bit import after_load

    quant_info.update(after_load(model, model_path, protection))
    if zero3 and quant is not None:
        from rayquant.zero import partition_quantized_model

        quant_info.update(partition_quantized_model(model))
    torch.manual_seed(seed)
    config = LoraConfig(r=job.lora_rank, lora_alpha=job.effective_lora_alpha, lora_dropout=job.lora_dropout,
                        target_modules=_lora_targets(job), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer
