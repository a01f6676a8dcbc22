"""The `logits` term: the LM head's logits and the loss (chunked with `unsloth`, whole with `hf`)."""

from __future__ import annotations

import math

from planner.hardware import GIB, MIB, GpuSpec
from planner.architecture import ModelSpec
from planner.tensor_bytes import SIXTEEN_BIT_BYTES

# Unsloth's CausalLM forward (unsloth/models/llama.py _CausalLM_fast_forward) never materializes the
# logits: it calls unsloth_fused_ce_loss, which (UNSLOTH_CHUNKED_CE=1 and UNSLOTH_FUSED_LINEAR=1 by
# default) runs unsloth_zoo/fused_losses/fused_linear.py `_ce_impl`: the gradient is taken in the
# forward, chunk by chunk, into ONE reused [rows, vocab] logits buffer (`_Buffers`), fp32 where an
# fp32-output GEMM exists (CUDA, cc >= 8: `_logits_mode`), else 16-bit; the hidden-state gradient
# [tokens, h] (16-bit) is kept for the backward. Rows per chunk (`fused_linear_rows`): the power of two
# at or below tokens*h/vocab, at least the power of two at or below 512*151936/vocab (>= 512), at most
# 4096, and at most 2 GiB / (vocab * bytes per logit) (`_CHUNK_GB`). On cards > 24.5 GiB with >= 4096
# labelled rows, and on every cc >= 8 card <= 24.5 GiB (`_flash_min_rows_auto`), the frozen head takes
# the tiled "flash" path instead (`_tiled_forward`): a [R, tile] fp32 buffer bounded by 256 MiB
# (`_BWD_TILE_BYTES`) plus an [R, h] fp32 accumulator, R = min(4096, labelled rows).
UNSLOTH_CE_MIN_LOGITS = 512 * 151936
UNSLOTH_CE_MAX_ROWS = 4096
UNSLOTH_CE_CHUNK_BYTES = 2 * GIB
UNSLOTH_CE_TILE_BYTES = 256 * MIB
UNSLOTH_CE_TILE_COLS = 16384
UNSLOTH_CE_SMALL_CARD_BYTES = int(24.5 * GIB)
UNSLOTH_CE_FLASH_MIN_ROWS = 4096
# transformers ForCausalLMLoss (loss/loss_utils.py) with the hf backend: lm_head writes 16-bit
# logits (2 B, kept in the model output that TRL reads), `logits.float()` + log_softmax keeps the fp32
# log-probabilities (4 B) for the backward, and the backward holds the fp32 incoming gradient (4 B)
# and the fp32 input gradient (4 B) at once: 14 bytes per logit at the peak.
HF_LOGIT_BYTES = 2 + 4 + 4 + 4
# With a 4-bit base the hf backend runs peft's prepare_model_for_kbit_training, which upcasts lm_head
# and the final norm to fp32: lm_head then writes fp32 logits (4 B; `logits.float()` is a no-op),
# log_softmax keeps its fp32 output (4 B), and the backward holds the fp32 incoming gradient and the
# fp32 input gradient (4 + 4 B): 16 bytes per logit at the peak.
HF_KBIT_LOGIT_BYTES = 4 + 4 + 4 + 4


def _power_of_two_at_most(x: float) -> int:
    """The largest power of two <= x, as `fused_linear_rows` rounds (0 for x < 1)."""
    p = 1 << max(math.ceil(math.log2(max(x, 1))), 0)
    return p // 2 if p > x else p


def unsloth_ce_bytes(model: ModelSpec, gpu: GpuSpec, tokens: int, labelled: int) -> int:
    """Peak bytes of Unsloth's fused linear cross entropy (see the constants above for the source):
    the reused logits buffer, its row statistics, and the [tokens, h] 16-bit hidden-state gradient
    it keeps for the backward. `labelled` is the number of rows with a target (tokens - b)."""
    h, vocab = model.hidden_size, model.vocab_size
    cuda_fp32 = not gpu.is_cpu and tuple(gpu.compute_capability) >= (8, 0)
    per_logit = 4 if cuda_fp32 else SIXTEEN_BIT_BYTES
    grad_hidden = SIXTEEN_BIT_BYTES * tokens * h
    if labelled <= 0:  # one-token sequences: no next token to predict, no logits
        return grad_hidden
    stats = 3 * 4 * labelled  # log-probs, lse, divisor bookkeeping: fp32 per labelled row
    small_card = gpu.memory_bytes <= UNSLOTH_CE_SMALL_CARD_BYTES
    flash_min_rows = 0 if small_card else UNSLOTH_CE_FLASH_MIN_ROWS
    if cuda_fp32 and labelled >= flash_min_rows:
        rows = min(UNSLOTH_CE_MAX_ROWS, labelled, UNSLOTH_CE_TILE_BYTES // (UNSLOTH_CE_TILE_COLS * 4))
        tile = max(UNSLOTH_CE_TILE_BYTES // (rows * 4), UNSLOTH_CE_TILE_COLS)
        if small_card:
            tile = min(tile, UNSLOTH_CE_TILE_COLS)
        tile = min(tile - tile % UNSLOTH_CE_TILE_COLS,
                   math.ceil(vocab / UNSLOTH_CE_TILE_COLS) * UNSLOTH_CE_TILE_COLS)
        return grad_hidden + stats + rows * tile * 4 + rows * h * 4
    rows = _power_of_two_at_most(labelled * h / vocab)
    min_rows = min(max(_power_of_two_at_most(UNSLOTH_CE_MIN_LOGITS / vocab), 512), UNSLOTH_CE_MAX_ROWS)
    rows = min(max(rows, min_rows), UNSLOTH_CE_MAX_ROWS)
    rows = min(rows, max(UNSLOTH_CE_CHUNK_BYTES // (vocab * per_logit), 2), max(labelled, 1))
    padded_vocab = math.ceil(vocab / 8) * 8  # `_Buffers` pads rows to a multiple of 8 for cuBLAS
    # The per-chunk hidden-gradient product dz @ W is an fp32 [rows, h] temporary (`_dz_w`).
    return grad_hidden + stats + rows * padded_vocab * per_logit + rows * h * 4


def logit_bytes(model: ModelSpec, gpu: GpuSpec, *, backend: str, micro_batch_size: int, seq_len: int,
                full_finetune: bool, kbit_upcast: bool = False) -> int:
    """The `logits` term: Unsloth's fused CE (plus, for a trainable head, its gradient accumulated
    over the chunks, `acc_w` in the head's dtype), or transformers' whole fp32 loss (HF_LOGIT_BYTES
    per logit)."""
    tokens = micro_batch_size * seq_len
    if backend == "unsloth":
        head_grad = SIXTEEN_BIT_BYTES * model.vocab_size * model.hidden_size if full_finetune else 0
        return unsloth_ce_bytes(model, gpu, tokens, tokens - micro_batch_size) + head_grad
    per_logit = HF_KBIT_LOGIT_BYTES if kbit_upcast else HF_LOGIT_BYTES
    return per_logit * tokens * model.vocab_size
