"""The throughput model's fitted constants. Written by scripts/fit_throughput.py from the fit rows
of planner/data/throughput_points.json; do not edit (tests/test_throughput_fit.py checks they match)."""

# Achievable fraction of the dense 16-bit peak in training GEMMs, per GPU class ("sm" + compute
# capability); classes without fit rows take the default (the classes' geometric mean).
GEMM_EFFICIENCY = {'sm80': 0.681, 'sm90': 0.344}
GEMM_EFFICIENCY_DEFAULT = 0.484
# Row-wise FP8 GEMMs run eagerly (Unsloth's FP8 path, rayquant/fp8.py): rate relative to the 16-bit
# efficiency on the FP8 peak, and bytes moved per input element by the activation cast (amax, scale,
# cast as separate kernels), at the peak bandwidth. 16-bit kernel efficiency of the same rows:
# 0.819.
FP8_RELATIVE_EAGER = 1.0
FP8_CAST_BYTES_PER_ELEMENT = 59.2
# torchao's compiled float8 training (all GEMMs FP8, casts fused): rate relative to 16-bit.
FP8_RELATIVE_COMPILED = 0.568
# Host seconds per decoder layer per micro-step (Python, kernel launches): the step takes the longer
# of this x layers and the GPU's work.
FIXED_SECONDS_PER_LAYER = {'unsloth': 0.0113, 'hf': 0.0087, 'compiled': 0.0, 'torchtune-eager': 0.0414}
# Median |predicted/measured - 1| over the check rows: the +- shown with every prediction.
EXPECTED_ERROR = 0.05
