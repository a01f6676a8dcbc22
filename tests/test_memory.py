"""planner.memory: byte counts against a real bitsandbytes + PEFT model, and the model's structure."""

from __future__ import annotations

import math

import pytest

from planner.architecture import ModelSpec
from planner.hardware import GIB, GpuSpec
from planner.memory import estimate_memory, max_seq_len
from planner.plan import PlanError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A real Llama shape at small size; dimensions are multiples of 128 so bnb blocks are exact.
SMALL_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=512,
                   intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False,
                   max_position_embeddings=4096)
LLAMA_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                tie_word_embeddings=False, max_position_embeddings=131072)


def gpu(gib: float, cc=(9, 0)) -> GpuSpec:
    return GpuSpec(name=f"test-{gib}", nvml_names=(), memory_bytes=int(gib * GIB), compute_capability=cc,
                   bf16_tflops=900.0 if cc >= (8, 0) else 0.0, fp16_tflops=900.0,
                   fp8_tflops=1800.0 if cc >= (8, 9) else None, bandwidth_gb_per_s=3000.0, source="test")


@pytest.fixture(scope="module")
def llama8b() -> ModelSpec:
    return ModelSpec.from_config(LLAMA_8B, name="llama-8b")


def test_checkpointing_modes_order_and_offload(llama8b):
    kw = dict(quantization="nf4", seq_len=4096, micro_batch_size=2)
    none, hf, uns = (estimate_memory(llama8b, gpu(80), gradient_checkpointing=m, **kw)
                     for m in ("none", "hf", "unsloth"))
    layer_input = 2 * 4096 * 2 * llama8b.hidden_size  # b x s x h, 16-bit: 32 MiB, over the 2 MiB cutoff
    # Unsloth offloads every layer input to pinned host RAM (power-of-two blocks, plus its 200
    # initial 256 KiB slots); the GPU keeps the last layer's input and two staging buffers.
    assert none.breakdown.activations > hf.breakdown.activations > uns.breakdown.activations
    # hf: every layer's input + the embedding output + the final norm's input; unsloth: the last
    # layer's input, two staging buffers and the final norm's input.
    assert (hf.breakdown.activations - uns.breakdown.activations
            == (llama8b.num_layers + 2 - 4) * layer_input)
    assert uns.host_bytes == 200 * 256 * 1024 + llama8b.num_layers * layer_input  # 32 MiB is a power of two
    assert hf.host_bytes == 0 and none.host_bytes == 0


def test_unsloth_offload_cutoff_and_pinned_rounding(llama8b):
    from planner.memory.activations import unsloth_offload_host_bytes
    # 256 tokens x 4096 x 2 B = 2 MiB: not over MINIMUM_SIZE, so the inputs stay on the GPU.
    small = dict(quantization="nf4", seq_len=256, micro_batch_size=1)
    hf, uns = (estimate_memory(llama8b, gpu(80), gradient_checkpointing=m, **small) for m in ("hf", "unsloth"))
    assert uns.breakdown.activations == hf.breakdown.activations
    assert uns.host_bytes == 200 * 256 * 1024
    # 3000 tokens: 23.4 MiB per input, pinned as 32 MiB blocks.
    assert unsloth_offload_host_bytes(3000 * 8192, 32) == 200 * 256 * 1024 + 32 * 32 * 2**20


def test_host_ram_the_offload_needs_is_checked_against_the_node():
    from planner.hardware import NodeType, lookup_gpu
    from planner.plan import JobSpec
    from planner.search import make_plan

    model = ModelSpec.from_config(LLAMA_8B, name="llama-8b")
    job = JobSpec(seq_len=32768, global_batch_size=2, lora_rank=16, quantization="nf4",
                  gradient_checkpointing="unsloth", micro_batch_size=1)
    h100 = lookup_gpu("H100-80GB")
    # 32 layers x 256 MiB (32768 x 4096 x 2 B) = 8 GiB per worker, 2 workers: 16 GiB.
    plan = make_plan(model, [NodeType(h100, 2, 1, host_memory_bytes=64 * GIB)], job)
    (node,) = plan.node_plans
    assert node.gradient_checkpointing == "unsloth" and node.host_memory_bytes >= 8 * GIB
    with pytest.raises(PlanError) as e:
        make_plan(model, [NodeType(h100, 2, 1, host_memory_bytes=12 * GIB)], job)
    msg = str(e.value)
    assert "host RAM" in msg and "12.0 GiB" in msg and "To fix" in msg
    assert "gradient_checkpointing hf" in msg and "{" not in msg


def test_weights_by_scheme(llama8b):
    w = {q: estimate_memory(llama8b, gpu(80), quantization=q).breakdown.weights
         for q in ("bf16", "fp8", "nf4")}
    assert w["bf16"] == 2 * llama8b.num_params
    assert w["nf4"] < w["fp8"] < w["bf16"]
    dyn = estimate_memory(llama8b, gpu(80), quantization="dynamic-4bit", protected_bytes=10**9)
    assert dyn.breakdown.weights == w["nf4"] + 10**9


def test_hf_logits_are_full_fp32_and_unsloth_chunked(llama8b):
    hf = estimate_memory(llama8b, gpu(80), backend="hf", seq_len=8192, micro_batch_size=4)
    un = estimate_memory(llama8b, gpu(80), backend="unsloth", seq_len=8192, micro_batch_size=4)
    assert hf.breakdown.logits >= 4 * 8192 * 4 * llama8b.vocab_size
    assert un.breakdown.logits < hf.breakdown.logits / 4


def test_cpu_device_has_no_cuda_context(llama8b):
    cpu = gpu(64, cc=(0, 0))
    on_cpu = estimate_memory(llama8b, cpu)
    on_gpu = estimate_memory(llama8b, gpu(64))
    assert on_gpu.breakdown.overhead - on_cpu.breakdown.overhead >= 512 * 1024**2


def test_full_finetune_counts_every_parameter(llama8b):
    e = estimate_memory(llama8b, gpu(80), quantization="bf16", full_finetune=True,
                        optimizer="adamw_torch", gradient_checkpointing="unsloth")
    assert e.trainable_params == llama8b.num_params
    assert e.breakdown.gradients == 2 * llama8b.num_params
    assert e.breakdown.optimizer == 4 * llama8b.num_params
    with pytest.raises(PlanError, match="16-bit"):
        estimate_memory(llama8b, gpu(80), quantization="nf4", full_finetune=True)


def test_zero3_shards_state(llama8b):
    one = estimate_memory(llama8b, gpu(80), quantization="bf16", full_finetune=True, backend="hf",
                          gradient_checkpointing="hf", optimizer="adamw_torch")
    eight = estimate_memory(llama8b, gpu(80), quantization="bf16", full_finetune=True, backend="hf",
                            gradient_checkpointing="hf", optimizer="adamw_torch", num_shards=8)
    assert eight.breakdown.optimizer == math.ceil(one.breakdown.optimizer / 8)
    assert eight.breakdown.weights < one.breakdown.weights / 4


def test_zero3_shards_packed_4bit_codes_and_keeps_quant_states_whole():
    from planner.memory.weights import _quant_state_bytes, head_bytes, layer_groups, weight_bytes

    llama70b = ModelSpec.from_config(dict(LLAMA_8B, hidden_size=8192, num_hidden_layers=80,
                                          num_attention_heads=64, intermediate_size=28672), name="70b")
    kw = dict(quantization="nf4", backend="hf", gradient_checkpointing="hf", optimizer="adamw_8bit")

    def weights(n: int) -> int:
        return estimate_memory(llama70b, gpu(24), num_shards=n, **kw).breakdown.weights

    states = sum(n * _quant_state_bytes(x, "nf4", True) for x, n in layer_groups(llama70b))
    # No fp32 upcast of the 16-bit parameters under ZeRO-3 (prepare_model_for_kbit_training skipped):
    # the whole base is the unsloth-backend count, below the hf one.
    whole = weight_bytes(llama70b, quantization="nf4", double_quant=True, backend="unsloth", protected_bytes=0)
    assert whole < weight_bytes(llama70b, quantization="nf4", double_quant=True, backend="hf", protected_bytes=0)
    # What more shards save is the sharded part only: the quant states stay whole on every rank.
    assert weights(4) - weights(8) == math.ceil((whole - states) / 4) - math.ceil((whole - states) / 8)
    fixed = weights(8) - math.ceil((whole - states) / 8)
    assert fixed > states
    # Beside them: the 16-bit lm_head gathered whole (bigger than a packed 4-bit layer) and a prefetch.
    assert states + head_bytes(llama70b) < fixed < states + head_bytes(llama70b) + 0.2 * GIB
    # Per GPU over 4 of 24 GiB: the 4-bit base is about a quarter of the 16-bit one, and fits.
    bf16 = estimate_memory(llama70b, gpu(24), num_shards=4, **dict(kw, quantization="bf16"))
    assert weights(4) < bf16.breakdown.weights / 2.5 and weights(4) < 13 * GIB
    # Host RAM: each rank loads the whole 4-bit base there before it is partitioned; a 16-bit base
    # loads shard by shard under zero.Init.
    assert estimate_memory(llama70b, gpu(24), num_shards=4, **kw).host_bytes == whole
    assert bf16.host_bytes == 0


def test_zero3_keeps_the_last_layers_gathered_when_their_reuse_is_near(llama8b):
    # DeepSpeed keeps parameters reused within 1e9 elements of the module trace. Llama-8B's lm_head
    # (0.53e9 elements) leaves room for the last few 4-bit layers (55e6 packed elements each, reused
    # after the head and the layers between, twice) to stay gathered into the backward.
    from planner.memory.weights import _quant_state_bytes, head_bytes, layer_groups, layer_weight_bytes, weight_bytes

    (linears, _), = layer_groups(llama8b)
    layer = layer_weight_bytes(llama8b, linears, "nf4", True) - _quant_state_bytes(linears, "nf4", True)
    states = llama8b.num_layers * _quant_state_bytes(linears, "nf4", True)
    whole = weight_bytes(llama8b, quantization="nf4", double_quant=True, backend="unsloth", protected_bytes=0)
    w = estimate_memory(llama8b, gpu(24), quantization="nf4", backend="hf", gradient_checkpointing="hf",
                        num_shards=4).breakdown.weights
    gathered = w - math.ceil((whole - states) / 4) - states
    kept = (gathered - head_bytes(llama8b)) / layer
    assert 5 <= kept < 6  # 5 layers kept, plus a prefetch smaller than one layer


def test_paged_optimizer_moves_large_states_to_host(llama8b):
    kw = dict(quantization="nf4", full_finetune=False, lora_rank=64)
    plain = estimate_memory(llama8b, gpu(80), optimizer="adamw_8bit", **kw)
    paged = estimate_memory(llama8b, gpu(80), optimizer="paged_adamw_8bit", **kw)
    assert paged.breakdown.optimizer < plain.breakdown.optimizer
    assert paged.host_bytes - plain.host_bytes == plain.breakdown.optimizer - paged.breakdown.optimizer


def test_max_seq_len_is_the_boundary(llama8b):
    g = gpu(24)
    kw = dict(quantization="nf4", micro_batch_size=1, gradient_checkpointing="hf", backend="hf")
    s = max_seq_len(llama8b, g, **kw)
    assert 0 < s < llama8b.max_position_embeddings
    assert estimate_memory(llama8b, g, seq_len=s, **kw).peak_bytes <= g.memory_bytes
    assert estimate_memory(llama8b, g, seq_len=s + 1, **kw).peak_bytes > g.memory_bytes
    assert max_seq_len(llama8b, gpu(2), **kw) == 0


def test_module_bytes_cover_every_layer(llama8b):
    e = estimate_memory(llama8b, gpu(80), quantization="nf4", gradient_checkpointing="none")
    names = [n for n in e.module_bytes if n.startswith("model.layers.")]
    assert len(names) == llama8b.num_layers
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(e.module_bytes)
    assert e.module_bytes["lm_head"] >= e.breakdown.logits


def _real_bytes(tmp_path, rank=16, optimizer="adamw_8bit"):
    """Build SMALL_LLAMA with random weights, load it in NF4 + double quant with bitsandbytes, apply
    LoRA with PEFT, take one step of bitsandbytes' AdamW8bit (or PagedAdamW8bit, which on the CPU
    keeps its states as plain tensors); return (weights, adapters, optimizer) bytes."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in SMALL_LLAMA.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                                 dtype=torch.bfloat16, device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=list(TARGETS),
                                             task_type="CAUSAL_LM"))
    seen: dict[int, object] = {}  # data_ptr -> tensor, kept alive so addresses are not reused

    def nbytes(t) -> int:
        if t is None or not torch.is_tensor(t) or t.data_ptr() in seen:
            return 0
        seen[t.data_ptr()] = t
        return t.numel() * t.element_size()

    weights = adapters = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            adapters += nbytes(p)
            continue
        weights += nbytes(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            weights += nbytes(qs.absmax) + nbytes(qs.code) + nbytes(qs.offset)
            if qs.nested:
                weights += nbytes(qs.state2.absmax) + nbytes(qs.state2.code)
    trainable = [p for p in model.parameters() if p.requires_grad]
    cls = bnb.optim.PagedAdamW8bit if optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    opt = cls(trainable, lr=1e-4)
    ids = torch.randint(0, SMALL_LLAMA["vocab_size"], (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    # Per-parameter states; the quantization maps (qmap1/qmap2) are shared, so count them once.
    optimizer = sum(v.numel() * v.element_size() for p in trainable for k, v in opt.state[p].items()
                    if torch.is_tensor(v) and not k.startswith("qmap"))
    qmaps = {id(v): v for p in trainable for k, v in opt.state[p].items() if k.startswith("qmap")}
    optimizer += sum(v.numel() * v.element_size() for v in qmaps.values())
    return weights, adapters, optimizer


# Rank 7 puts every lora_A (7 x 512 = 3,584 elements) under bitsandbytes' min_8bit_size (4,096):
# those keep two fp32 states, the lora_Bs (256 x 7 up to 1,536 x 7) two uint8 states + absmax.
@pytest.mark.parametrize("rank, optimizer", [(16, "adamw_8bit"), (7, "adamw_8bit"), (7, "paged_adamw_8bit")])
def test_bytes_match_a_real_bnb_peft_model(tmp_path, rank, optimizer):
    weights, adapters, real_optimizer = _real_bytes(tmp_path, rank, optimizer)
    spec = ModelSpec.from_config(SMALL_LLAMA, name="small-llama")
    est = estimate_memory(spec, gpu(80), quantization="nf4", double_quant=True, lora_rank=rank,
                          lora_targets=TARGETS, optimizer=optimizer)
    assert est.breakdown.weights == weights
    assert est.breakdown.adapters == adapters
    # Exact to the byte; a paged optimizer's large states are in host RAM on a GPU (the sum is the same).
    plain = estimate_memory(spec, gpu(80), quantization="nf4", double_quant=True, lora_rank=rank,
                            lora_targets=TARGETS, optimizer="adamw_8bit")
    assert est.breakdown.optimizer + est.host_bytes - plain.host_bytes == real_optimizer


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "adamw_torch"])
def test_layer_map_shares_are_the_exact_state_bytes(llama8b, optimizer):
    """The layer map's per-module state (adapters, gradients, optimizer states on the device) adds up
    to the estimate's terms, the shared 8-bit qmaps aside: no per-parameter average."""
    from planner.tensor_bytes import BNB_QMAP_BYTES
    kw = dict(quantization="nf4", seq_len=1, lora_rank=16, gradient_checkpointing="hf", optimizer=optimizer)
    e = estimate_memory(llama8b, gpu(80), **kw)
    from planner.memory.weights import layer_weight_bytes
    # Without the trainable state a layer holds its NF4 weights and its input (1 token, 16-bit).
    bare = layer_weight_bytes(llama8b, llama8b.linear_layers(), "nf4", True) + 2 * llama8b.hidden_size
    layers = [k for k in e.module_bytes if k.startswith("model.layers.")]
    shares = sum(e.module_bytes[k] - bare for k in layers)
    qmaps = 0 if optimizer == "adamw_torch" else BNB_QMAP_BYTES
    b = e.breakdown
    assert shares == b.adapters + b.gradients + b.optimizer - qmaps


def test_paged_8bit_keeps_absmax_on_the_device(llama8b):
    """PagedAdamW8bit pages state1/state2 (get_state_buffer) of tensors >= 1e5 elements; the absmax
    vectors are plain device tensors (Optimizer2State.init_state)."""
    from planner.memory.trainable import optimizer_bytes
    big, small = 4096 * 64, 4096
    gpu_b, host = optimizer_bytes([big, small], "paged_adamw_8bit", False)
    assert host == 2 * big
    from planner.tensor_bytes import BNB_QMAP_BYTES
    assert gpu_b == BNB_QMAP_BYTES + 2 * 4 * (big // 256) + 2 * small + 2 * 4 * (small // 256)
