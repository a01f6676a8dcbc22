"""The GPU catalog as data: one row per GPU, each figure with its source.

Fields: name (catalog name), nvml (names NVML / nvidia-smi report), mib (total memory as nvidia-smi
shows it, MiB), cc (compute capability), bf16 / fp16 (dense tensor-core TFLOPS, FP32 accumulate;
bf16 0 where unsupported), fp8 (dense FP8 tensor-core TFLOPS; None without FP8 tensor cores),
bw (memory bandwidth, GB/s), source.

Sources (abbreviated in rows):
  SMI   memory totals read from public nvidia-smi logs (rayquant's gpu_specs calibration file;
        `MiB / <total>MiB` strings in public repositories).
  CC    https://developer.nvidia.com/cuda-gpus
  MLE   stas00/ml-engineering compute/accelerator/README.md (dense TFLOPS, bandwidth)
  TT    torchtitan `get_peak_flops` (dense bf16 peak per device name)
  LT    Lightning fabric/utilities/throughput.py `_CUDA_FLOPS`
  DS    NVIDIA product datasheets (dense = half the "with sparsity" figure)
  WP    NVIDIA Ampere GA102 and Ada AD102 whitepapers, appendix tables (GeForce/RTX rows:
        FP16/BF16 tensor TFLOPS with FP32 accumulate, the rate PyTorch matmuls use)
Figures marked "uncertain" disagree between sources or come from spec sites only.
"""

from __future__ import annotations

GPU_ROWS: tuple[dict, ...] = (
    dict(name="T4", nvml=("Tesla T4", "NVIDIA T4"), mib=15360, cc=(7, 5), bf16=0.0, fp16=65.0,
         fp8=None, bw=320.0, source="SMI; CC; LT fp16 65 (no bf16 on Turing); DS bandwidth 320 GB/s"),
    dict(name="V100-16GB", nvml=("Tesla V100-SXM2-16GB", "Tesla V100-PCIE-16GB", "Tesla V100-FHHL-16GB"),
         mib=16384, cc=(7, 0), bf16=0.0, fp16=125.0, fp8=None, bw=900.0,
         source="SMI 16384 MiB (older drivers: 16160); CC; LT fp16 125 (SXM2; no bf16 on Volta); "
                "DS 900 GB/s (uncertain: PCIe 112 TFLOPS)"),
    dict(name="V100-32GB", nvml=("Tesla V100-SXM2-32GB", "Tesla V100-PCIE-32GB", "Tesla V100S-PCIE-32GB"),
         mib=32768, cc=(7, 0), bf16=0.0, fp16=125.0, fp8=None, bw=900.0,
         source="SMI 32768 MiB (Tesla V100-SXM2-32GB logs); CC; LT fp16 125 (SXM2); DS 900 GB/s"),
    dict(name="A10", nvml=("NVIDIA A10",), mib=23028, cc=(8, 6), bf16=125.0, fp16=125.0, fp8=None,
         bw=600.0, source="SMI 23028 MiB with ECC on (24564 with ECC off); CC; DS A10 bf16 125 dense, "
                          "600 GB/s"),
    dict(name="A10G", nvml=("NVIDIA A10G",), mib=23028, cc=(8, 6), bf16=125.0, fp16=125.0, fp8=None,
         bw=600.0, source="SMI; CC; LT bf16 125 (uncertain: AWS publishes no tensor figure); "
                          "bandwidth 600 GB/s uncertain"),
    dict(name="L4", nvml=("NVIDIA L4",), mib=23034, cc=(8, 9), bf16=121.0, fp16=121.0, fp8=242.0,
         bw=300.0, source="SMI; CC; LT bf16 121; DS FP8 485 sparse = 242 dense; DS 300 GB/s"),
    dict(name="L40S", nvml=("NVIDIA L40S",), mib=46068, cc=(8, 9), bf16=362.0, fp16=362.0, fp8=733.0,
         bw=864.0, source="SMI; CC; MLE/TT bf16 362; DS FP8 1466 sparse = 733 dense; DS 864 GB/s"),
    dict(name="RTX-3090", nvml=("NVIDIA GeForce RTX 3090",), mib=24576, cc=(8, 6), bf16=71.0,
         fp16=71.0, fp8=None, bw=936.0,
         source="SMI; CC; WP GA102 RTX 3090 FP16/BF16 tensor with FP32 accumulate 71 dense "
                "(LT's 35.6 is the non-tensor rate); 936 GB/s"),
    dict(name="RTX-4090", nvml=("NVIDIA GeForce RTX 4090",), mib=24564, cc=(8, 9), bf16=165.2,
         fp16=165.2, fp8=330.3, bw=1008.0,
         source="SMI; CC; WP AD102 RTX 4090 FP16/BF16 tensor with FP32 accumulate 165.2 dense "
                "(LT's 82.6 is the non-tensor rate); FP8 with FP32 accumulate 330.3 (uncertain); "
                "1008 GB/s"),
    dict(name="RTX-A6000", nvml=("NVIDIA RTX A6000",), mib=49140, cc=(8, 6), bf16=154.8, fp16=154.8,
         fp8=None, bw=768.0,
         source="SMI 49140 MiB with ECC off (46068 with ECC on); CC; DS tensor 309.7 sparse = 154.8 "
                "dense (LT's 38.7 is the non-tensor rate); 768 GB/s"),
    dict(name="A40", nvml=("NVIDIA A40",), mib=46068, cc=(8, 6), bf16=149.7, fp16=149.7, fp8=None,
         bw=696.0, source="SMI 46068 MiB with ECC on (uncertain); CC; DS A40 BF16 tensor 299.4 sparse = "
                          "149.7 dense; DS 696 GB/s"),
    dict(name="RTX-6000-Ada", nvml=("NVIDIA RTX 6000 Ada Generation",), mib=49140, cc=(8, 9),
         bf16=364.2, fp16=364.2, fp8=728.5, bw=960.0,
         source="SMI 49140 MiB with ECC off (uncertain); CC; WP AD102 RTX 6000 Ada FP16/BF16 tensor "
                "with FP32 accumulate 364.2 dense, FP8 728.5 dense (uncertain); DS 960 GB/s"),
    dict(name="A100-40GB", nvml=("NVIDIA A100-SXM4-40GB",), mib=40960, cc=(8, 0), bf16=312.0,
         fp16=312.0, fp8=None, bw=1555.0, source="SMI; CC; MLE/TT bf16 312; DS 1555 GB/s"),
    dict(name="A100-40GB-PCIe", nvml=("NVIDIA A100-PCIE-40GB",), mib=40960, cc=(8, 0), bf16=312.0,
         fp16=312.0, fp8=None, bw=1555.0, source="SMI; CC; MLE/TT bf16 312; DS 1555 GB/s"),
    dict(name="A100-80GB", nvml=("NVIDIA A100-SXM4-80GB",), mib=81920, cc=(8, 0), bf16=312.0,
         fp16=312.0, fp8=None, bw=2000.0,
         source="SMI; CC; MLE bf16 312 (measured bf16 matmul 271 TFLOPS); DS 2039 GB/s (MLE 2000)"),
    dict(name="A100-80GB-PCIe", nvml=("NVIDIA A100 80GB PCIe",), mib=81920, cc=(8, 0), bf16=312.0,
         fp16=312.0, fp8=None, bw=1940.0,
         source="SMI; CC; MLE bf16 312 (measured bf16 matmul 253 TFLOPS); MLE 1940 GB/s"),
    dict(name="H100-80GB", nvml=("NVIDIA H100 80GB HBM3",), mib=81559, cc=(9, 0), bf16=989.0,
         fp16=989.0, fp8=1979.0, bw=3350.0,
         source="SMI; CC; MLE/TT bf16 989, FP8 1979 dense (measured 795 / 1403); 3350 GB/s"),
    dict(name="H100-PCIe", nvml=("NVIDIA H100 PCIe",), mib=81559, cc=(9, 0), bf16=756.0, fp16=756.0,
         fp8=1513.0, bw=2000.0, source="SMI; CC; MLE/TT bf16 756, FP8 1513 dense; 2000 GB/s"),
    dict(name="H100-NVL", nvml=("NVIDIA H100 NVL",), mib=95830, cc=(9, 0), bf16=835.0, fp16=835.0,
         fp8=1671.0, bw=3900.0,
         source="SMI 95830 MiB (public H100 NVL nvidia-smi logs); CC; TT bf16 835; DS FP8 3341 "
                "sparse = 1671 dense, 3.9 TB/s"),
    dict(name="H200", nvml=("NVIDIA H200", "NVIDIA H200 NVL"), mib=143771, cc=(9, 0), bf16=989.0,
         fp16=989.0, fp8=1979.0, bw=4800.0,
         source="SMI; CC; MLE/TT bf16 989, FP8 1979 dense (measured FP8 1453); 4800 GB/s "
                "(H200 NVL runs lower clocks: uncertain)"),
    dict(name="GH200", nvml=("NVIDIA GH200 480GB", "NVIDIA GH200 120GB", "GH200 120GB"), mib=97871,
         cc=(9, 0), bf16=989.0, fp16=989.0, fp8=1979.0, bw=4000.0,
         source="SMI 97871 MiB (public GH200 480GB nvidia-smi logs; 96 GB HBM3 version); CC; "
                "DS GH200 tensor figures equal H100 SXM; 4000 GB/s"),
    dict(name="B200", nvml=("NVIDIA B200",), mib=183359, cc=(10, 0), bf16=2250.0, fp16=2250.0,
         fp8=4500.0, bw=8000.0,
         source="SMI; CC; MLE/TT bf16 2250, FP8 4500 dense (measured 1745 / 3433); 8000 GB/s"),
)

# Names people type that are not catalog names or NVML names (normalized like lookup keys).
GPU_ALIASES: dict[str, str] = {
    "H100-SXM": "H100-80GB", "H100-SXM5": "H100-80GB", "H100-SXM-80GB": "H100-80GB",
    "A100-80GB-SXM": "A100-80GB", "A100-40GB-SXM": "A100-40GB", "RTX-A6000": "RTX-A6000",
    "RTX3090": "RTX-3090", "RTX4090": "RTX-4090", "H200-141GB": "H200", "B200-180GB": "B200",
}

# Names that fit more than one catalog GPU (memory or speed differ): refused with the choices,
# unless the GPU's real memory (NVML, live inventory) picks one (planner.hardware.lookup_gpu).
AMBIGUOUS_GPU_NAMES: dict[str, tuple[str, ...]] = {
    "A100": ("A100-40GB", "A100-80GB"),
    "A100-SXM": ("A100-40GB", "A100-80GB"),
    "A100-SXM4": ("A100-40GB", "A100-80GB"),
    "A100-PCIe": ("A100-40GB-PCIe", "A100-80GB-PCIe"),
    "H100": ("H100-80GB", "H100-PCIe", "H100-NVL"),
    "V100": ("V100-16GB", "V100-32GB"),
    "V100-SXM2": ("V100-16GB", "V100-32GB"),
    "V100-PCIe": ("V100-16GB", "V100-32GB"),
    "A6000": ("RTX-A6000", "RTX-6000-Ada"),
    "RTX6000": ("RTX-A6000", "RTX-6000-Ada"),
    "RTX-6000": ("RTX-A6000", "RTX-6000-Ada"),
}

# A generic GPU named only by its memory ("24GiB"): assumed Ampere-class and slow, so plans made
# from it are conservative. Ampere A10-class bf16 rate and bandwidth, rounded down.
GENERIC_GPU = dict(cc=(8, 0), bf16=100.0, fp16=100.0, fp8=None, bw=500.0,
                   source="generic GPU given by memory only: assumed compute capability 8.0 (bf16, "
                          "no FP8), 100 dense TFLOPS and 500 GB/s (conservative, A10-class); pass "
                          "a catalog name (`rayquant gpus`) for real figures")

# The CPU pseudo-device (CPU-only Ray clusters, the quickstart): no tensor cores (compute
# capability 0.0, so supports_bf16/fp8 are False); its 0.5 TFLOPS for any dtype is the order
# of a few AVX2/AVX-512 cores running bf16/fp32 matmuls in PyTorch.
CPU_ROW = dict(name="CPU", cc=(0, 0), bf16=0.5, fp16=0.5, fp8=None, bw=20.0,
               source="CPU pseudo-device: memory is host RAM; 0.5 TFLOPS and 20 GB/s are "
                      "order-of-magnitude figures for a few cores (not a GPU)")

# Links, for the throughput model (planner.throughput): name -> (host link GB/s per direction,
# GPU-to-GPU NVLink GB/s per direction or None where GPUs talk over PCIe, source). The host link
# carries Unsloth's offloaded checkpoints; NVLink (else the host link) carries a node's all-reduce.
#   PCIE  PCI Express x16 per direction: gen3 15.75, gen4 31.5, gen5 63 GB/s (PCI-SIG), rounded.
#   NVL   NVIDIA datasheets: NVLink total bandwidth / 2 per direction (V100 SXM2 300, A100 SXM 600,
#         H100/H200 SXM 900, B200 1800 GB/s); GH200's NVLink-C2C to the Grace CPU 900 GB/s total.
# Rows that mix SXM and PCIe boards (V100) or pair boards with a bridge (H100 NVL, RTX A6000) get no
# NVLink figure: the slower link is assumed.
GPU_LINKS: dict[str, tuple[float, float | None, str]] = {
    "T4": (16.0, None, "PCIE gen3"),
    "V100-16GB": (16.0, None, "PCIE gen3 (SXM2 boards also have NVLink; not assumed)"),
    "V100-32GB": (16.0, None, "PCIE gen3 (SXM2 boards also have NVLink; not assumed)"),
    "A10": (32.0, None, "PCIE gen4"),
    "A10G": (32.0, None, "PCIE gen4"),
    "L4": (32.0, None, "PCIE gen4"),
    "L40S": (32.0, None, "PCIE gen4"),
    "RTX-3090": (32.0, None, "PCIE gen4"),
    "RTX-4090": (32.0, None, "PCIE gen4"),
    "RTX-A6000": (32.0, None, "PCIE gen4 (NVLink bridge pairs not assumed)"),
    "RTX-6000-Ada": (32.0, None, "PCIE gen4"),
    "A100-40GB": (32.0, 300.0, "PCIE gen4; NVL A100 SXM 600 GB/s"),
    "A100-40GB-PCIe": (32.0, None, "PCIE gen4"),
    "A100-80GB": (32.0, 300.0, "PCIE gen4; NVL A100 SXM 600 GB/s"),
    "A100-80GB-PCIe": (32.0, None, "PCIE gen4"),
    "H100-80GB": (64.0, 450.0, "PCIE gen5; NVL H100 SXM 900 GB/s"),
    "H100-PCIe": (64.0, None, "PCIE gen5"),
    "H100-NVL": (64.0, None, "PCIE gen5 (NVLink bridge pairs not assumed)"),
    "H200": (64.0, 450.0, "PCIE gen5; NVL H200 SXM 900 GB/s (H200 NVL boards: bridge pairs)"),
    "GH200": (450.0, 450.0, "NVL NVLink-C2C 900 GB/s to the Grace CPU; NVLink 900 GB/s"),
    "B200": (64.0, 900.0, "PCIE gen5; NVL B200 1800 GB/s"),
}
# Any GPU not listed (a generic GPU given by memory): PCIe gen4, no NVLink.
DEFAULT_LINK: tuple[float, float | None, str] = (32.0, None, "PCIE gen4 assumed")
