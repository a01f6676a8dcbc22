"""Placeholder; scripts/fit_throughput.py writes this file."""
GEMM_EFFICIENCY = {"sm80": 0.5, "sm90": 0.5}
GEMM_EFFICIENCY_DEFAULT = 0.5
FP8_RELATIVE_EAGER = 0.7
FP8_CAST_BYTES_PER_ELEMENT = 50.0
FP8_RELATIVE_COMPILED = 0.7
FIXED_SECONDS_PER_LAYER = {"unsloth": 0.008, "eager": 0.004, "compiled": 0.0}
EXPECTED_ERROR = 0.25
