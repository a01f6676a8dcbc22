"""Bytes of one tensor by storage scheme: 16-bit, NF4 (with or without double quantization),
row-scaled FP8, and bitsandbytes' 8-bit AdamW states.

The one home of these counts: planner.memory sums them over a model, rayquant.dynamic4bit prices
keeping a module in 16-bit with them. tests/test_tensor_bytes.py checks them against the tensors
bitsandbytes really allocates. Standard library only.
"""

from __future__ import annotations

import math

SIXTEEN_BIT_BYTES = 2  # bf16 / fp16: the compute dtype of every scheme

# -- NF4 -------------------------------------------------------------------------------------------
# bitsandbytes Params4bit / quantize_4bit (bitsandbytes/nn/modules.py, functional.py): NF4 packs two
# 4-bit codes per uint8 and keeps one absmax per block of 64 values (blocksize defaults to 64).
NF4_BLOCK = 64
# Double quantization (QLoRA paper sec. 3; bitsandbytes `compress_statistics=True`): the fp32
# absmax is itself quantized blockwise to uint8 with a second block size of 256, keeping one fp32
# absmax per 256 first-level blocks, a 256-entry fp32 code book and an fp32 offset per tensor.
NF4_DQ_BLOCK = 256
NF4_DQ_CODE_BYTES = 256 * 4 + 4
NF4_CODE_BYTES = 16 * 4  # the 16-value NF4 code book each QuantState holds (get_4bit_type)

# -- FP8 -------------------------------------------------------------------------------------------
# FP8 (Unsloth load_in_fp8 / torchao Float8 row-wise, and rayquant's row-wise linear): one e4m3 byte
# per weight plus one fp32 scale per output row.
FP8_SCALE_BYTES = 4

# -- bitsandbytes 8-bit AdamW ----------------------------------------------------------------------
# bitsandbytes Optimizer2State.init_state (bitsandbytes/optim/optimizer.py): tensors with fewer than
# min_8bit_size=4096 elements keep two fp32 states; larger ones two uint8 states plus one fp32 absmax
# per 256-value block for each; two shared 256-entry fp32 quantization maps (qmap1/qmap2).
BNB_MIN_8BIT_SIZE = 4096
BNB_OPT_BLOCK = 256
BNB_QMAP_BYTES = 2 * 256 * 4


def sixteen_bit_bytes(numel: int) -> int:
    """Bytes of a bf16/fp16 tensor."""
    return SIXTEEN_BIT_BYTES * numel


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of the tensors bitsandbytes allocates for one NF4 weight: the packed codes (ceil(n/2)
    uint8) and the absmax statistics (one fp32 per block of 64; with double quantization one uint8
    per block plus one fp32 per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits per value, QLoRA
    sec. 3). The per-tensor code books are left out: see nf4_tensor_bytes."""
    blocks = math.ceil(numel / NF4_BLOCK)
    absmax = blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) if double_quant else 4 * blocks
    return math.ceil(numel / 2) + absmax


def nf4_tensor_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one NF4 weight with its whole QuantState: nf4_bytes plus the per-tensor NF4 code
    book, and with double quantization the second-level code book and offset."""
    return nf4_bytes(numel, double_quant) + NF4_CODE_BYTES + (NF4_DQ_CODE_BYTES if double_quant else 0)


def fp8_rowwise_bytes(in_features: int, out_features: int) -> int:
    """Bytes of one FP8 weight (out x in) with its fp32 per-row scales."""
    return in_features * out_features + FP8_SCALE_BYTES * out_features


def adamw_8bit_state_bytes(numel: int) -> int:
    """bitsandbytes AdamW8bit states of one parameter tensor (the shared qmaps not included)."""
    return sum(adamw_8bit_state_parts(numel))


def adamw_8bit_state_parts(numel: int) -> tuple[int, int]:
    """(state1 + state2, absmax1 + absmax2) bytes of one tensor's AdamW8bit states. A paged optimizer
    allocates only state1/state2 through `get_state_buffer` (unified memory when numel >= 1e5); the
    absmax vectors are plain `torch.zeros` on the device."""
    if numel < BNB_MIN_8BIT_SIZE:
        return 2 * 4 * numel, 0
    return 2 * numel, 2 * 4 * math.ceil(numel / BNB_OPT_BLOCK)
