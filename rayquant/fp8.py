"""FP8 base weights for LoRA: which FP8 path a GPU takes, and our own row-scaled FP8 linear.

Two paths (planner.hardware.fp8_path_for picks one by compute capability; the plan records it in
`NodePlan.fp8_path`):

* ``"unsloth"`` (compute capability 9.x and newer): Unsloth's ``load_in_fp8=True``. Unsloth quantizes
  the checkpoint once with torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` and loads
  that (unsloth/models/loader_utils.py ``_offline_quantize_to_fp8``); it refuses below cc 9.0 and needs
  torch >= 2.9 and torchao >= 0.15 (``_get_fp8_mode_and_check_settings``). :func:`unsloth_fp8_problems`
  says what is missing before a worker tries.
* ``"rowwise"`` (cc 8.9, Ada: L4, L40S, RTX 4090, where Unsloth's on-the-fly FP8 refuses): load the base
  in 16-bit, then :func:`convert_linears_to_fp8` replaces the decoder's linear layers with
  :class:`Fp8RowwiseLinear`: e4m3 weights with one fp32 scale per output row, activations quantized per
  row on the fly, and ``torch._scaled_mm`` for the product (it runs on CPU too, so CI tests numerics).

The base stays frozen; gradients flow to the layer's input so LoRA adapters (PEFT wraps
``Fp8RowwiseLinear`` as it wraps any ``nn.Linear``) train on top.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Iterable

import torch
from torch import nn

from planner.hardware import fp8_path_for

# Largest finite e4m3 value (torch.finfo(torch.float8_e4m3fn).max; OCP FP8 spec, table 1).
E4M3_MAX = 448.0
# A row of zeros would give a zero scale; this floor keeps the division finite (torchao uses 1e-12 as
# activation_value_lb in Unsloth's config, unsloth_zoo/vllm_utils.py `_get_torchao_fp8_config`).
_SCALE_FLOOR = 1e-12
# Modules never converted: embeddings and norms are not nn.Linear anyway; lm_head (logits precision)
# and MoE routers (routing is sensitive) stay 16-bit, as Unsloth's SKIP_QUANTIZATION_MODULES keeps them.
DEFAULT_SKIP = ("lm_head", "router", "mlp.gate", "block_sparse_moe.gate", "moe.gate", "score")

def unsloth_fp8_problems() -> list[str]:
    """What stops Unsloth's load_in_fp8 on this machine (empty when it can run), each with a fix."""
    from packaging.version import Version

    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU: load_in_fp8 needs compute capability >= 9.0 (H100, H200, B200)")
    elif fp8_path_for(torch.cuda.get_device_capability()) != "unsloth":
        cc = torch.cuda.get_device_capability()
        problems.append(f"GPU has compute capability {cc[0]}.{cc[1]}; load_in_fp8 needs >= 9.0. "
                        "To fix: use fp8_path='rowwise' (cc 8.9) or 4-bit")
    if Version(torch.__version__.split("+")[0]) < Version("2.9.0"):
        problems.append(f"torch {torch.__version__} < 2.9.0. To fix: pip install 'torch>=2.9'")
    if importlib.util.find_spec("torchao") is None:
        problems.append("torchao is not installed. To fix: pip install 'torchao>=0.15'")
    else:
        import importlib.metadata as md

        if Version(md.version("torchao")) < Version("0.15.0"):
            problems.append(f"torchao {md.version('torchao')} < 0.15.0. To fix: pip install -U torchao")
    return problems


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and fp32 scales (one per row of the last dim) with x ~= values * scales."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / E4M3_MAX).clamp_min(_SCALE_FLOOR)
    values = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values, scale


_SCALED_MM_OK: dict[str, bool] = {}


def scaled_mm_rowwise_supported(device: torch.device) -> bool:
    """Whether torch._scaled_mm with row-wise scales runs on this device (probed once per device).

    It does on CPU and on CUDA cc >= 9.0; on cc 8.9 it depends on the torch build. Where it does not,
    Fp8RowwiseLinear falls back to dequantizing the weight to 16-bit per call (still 1 byte/param at
    rest, no FP8 speed-up).
    """
    key = str(device)
    if key not in _SCALED_MM_OK:
        try:
            a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
            b = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
            out = torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1, device=device),
                                   scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
            _SCALED_MM_OK[key] = bool(torch.allclose(out.float(), torch.full_like(out.float(), 16.0)))
        except (RuntimeError, NotImplementedError, TypeError):
            _SCALED_MM_OK[key] = False
    return _SCALED_MM_OK[key]


def _dims_ok(in_features: int, out_features: int) -> bool:
    # cuBLASLt FP8 GEMMs need both GEMM dims divisible by 16 (torch's _scaled_mm checks this on CUDA).
    return in_features % 16 == 0 and out_features % 16 == 0


class _Fp8RowwiseMatmul(torch.autograd.Function):
    """y = x @ (w_fp8 * w_scale).T with x quantized per row; backward gives dL/dx only (base frozen)."""

    @staticmethod
    def forward(ctx, x2d, weight_fp8, weight_scale, use_scaled_mm):
        ctx.save_for_backward(weight_fp8, weight_scale)
        ctx.x_dtype = x2d.dtype
        if use_scaled_mm:
            xq, x_scale = quantize_rowwise(x2d)
            # _scaled_mm wants mat2 column-major: weight_fp8 is (out, in) row-major, so .t() is.
            out = torch._scaled_mm(xq, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale.t(),
                                   out_dtype=torch.bfloat16)
            return out.to(x2d.dtype)
        w = (weight_fp8.to(torch.float32) * weight_scale).to(x2d.dtype)
        return x2d @ w.t()

    @staticmethod
    def backward(ctx, grad_out):
        weight_fp8, weight_scale = ctx.saved_tensors
        # dL/dx = g @ W with W = diag(s) Wq: fold the row scales into g, then one 16-bit GEMM against
        # the dequantized weight. The transient 16-bit copy is one layer's weight (as Unsloth's FP8
        # backward, unsloth/kernels/fp8.py, dequantizes); e4m3 gradients would lose too much range.
        dtype = grad_out.dtype
        w = weight_fp8.to(dtype)
        grad_x = (grad_out * weight_scale.t().to(dtype)) @ w
        return grad_x.to(ctx.x_dtype), None, None, None


class Fp8RowwiseLinear(nn.Linear):
    """A frozen nn.Linear whose weight is e4m3 with one fp32 scale per output row.

    Memory at rest: 1 byte per weight + 4 bytes per output row (+ a 16-bit bias if any). It subclasses
    nn.Linear so PEFT's LoRA dispatch (peft/tuners/lora/layer.py ``dispatch_default``) wraps it, and it
    exposes ``compute_dtype`` so PEFT keeps adapters in that dtype instead of casting them to float8
    (``_get_base_layer_device_and_dtype`` reads it, as for bitsandbytes' Linear4bit).
    """

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full-precision weight
        self.out_features, self.in_features = weight_fp8.shape
        self.weight = nn.Parameter(weight_fp8, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> "Fp8RowwiseLinear":
        dtype = compute_dtype or (linear.weight.dtype if linear.weight.dtype.is_floating_point
                                  else torch.bfloat16)
        weight_fp8, scale = quantize_rowwise(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data
        return cls(weight_fp8, scale, bias, dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()
        use_mm = _dims_ok(self.in_features, self.out_features) and scaled_mm_rowwise_supported(x.device)
        out = _Fp8RowwiseMatmul.apply(x2d, self.weight, self.weight_scale, use_mm)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=float8_e4m3fn row-scaled, "
                f"compute_dtype={self.compute_dtype}")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    # Same matching as transformers' should_convert_module: a prefix, a regex from the start, or a suffix.
    return any(re.match(rf"{s}\.", name) or re.match(s, name) or name.endswith(s) for s in skip)


def convert_linears_to_fp8(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP,
                           compute_dtype: torch.dtype | None = None) -> list[str]:
    """Replace every plain nn.Linear not matched by `skip` with an Fp8RowwiseLinear, in place.

    Embeddings and norms are not linear layers and stay as they are; lm_head and routers are skipped by
    default. Call before applying LoRA. Returns the converted module names.
    """
    skip = tuple(skip)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not _skipped(name, skip)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8RowwiseLinear.from_linear(module, compute_dtype))
        del module
    return [name for name, _ in targets]


def fp8_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the FP8 layers of `model`: e4m3 weights, their scales and biases."""
    total = 0
    for module in model.modules():
        if isinstance(module, Fp8RowwiseLinear):
            total += module.weight.numel() * module.weight.element_size()
            total += module.weight_scale.numel() * module.weight_scale.element_size()
            if module.bias is not None:
                total += module.bias.numel() * module.bias.element_size()
    return total


def after_load(model, node_plan) -> dict:
    """For rayquant.loading, after a 16-bit load and before LoRA: the ``rowwise`` FP8 path converts the
    decoder's linears. Returns the manifest fields ({} for other schemes)."""
    if node_plan.quantization != "fp8" or node_plan.fp8_path != "rowwise":
        return {}
    converted = convert_linears_to_fp8(model)
    return {"fp8_path": "rowwise", "fp8_modules": len(converted), "fp8_weight_bytes": fp8_weight_bytes(model)}
