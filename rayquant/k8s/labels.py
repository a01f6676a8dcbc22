"""Node labels: the GPU product label values that select a GPU's nodes under each labelling scheme
(GPU feature discovery, GKE, Karpenter), the Ray node-type label workers are pinned by, and the
syntax Kubernetes allows in label keys and values."""

from __future__ import annotations

import re
from typing import Mapping

from planner.hardware import GpuSpec
from rayquant.k8s.errors import K8sError
# The Ray node label workers are pinned by, and its value per node type: one definition, shared
# with the placement that selects on it.
from rayquant.placement import NODE_TYPE_LABEL, node_type_label_value

__all__ = ["GFD_PRODUCT_LABEL", "GKE_ACCELERATOR_LABEL", "KARPENTER_GPU_LABEL", "KNOWN_GPU_LABELS",
           "NODE_TYPE_LABEL", "node_type_label_value", "gpu_label_values", "group_name"]

GFD_PRODUCT_LABEL = "nvidia.com/gpu.product"
# GPU product label values per labelling scheme. GPU feature discovery (NVIDIA k8s-device-plugin,
# internal/lm/resource.go) publishes the NVML device name with spaces replaced by '-', so those come
# from GpuSpec.nvml_names. Cloud labels are tables:
# GKE: cloud.google.com/gke-accelerator values, https://cloud.google.com/kubernetes-engine/docs/how-to/gpus
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
# Keys are GPU catalog names (planner/catalog_gpus.py); A3 and A3 Mega machines both carry the
# H100 80GB HBM3 board under two label values.
GKE_ACCELERATORS = {
    "B200": ("nvidia-b200",), "H200": ("nvidia-h200-141gb",),
    "H100-80GB": ("nvidia-h100-80gb", "nvidia-h100-mega-80gb"), "A100-80GB": ("nvidia-a100-80gb",),
    "A100-40GB": ("nvidia-tesla-a100",), "L4": ("nvidia-l4",), "T4": ("nvidia-tesla-t4",),
    "V100-16GB": ("nvidia-tesla-v100",),
}
# Karpenter on AWS: karpenter.k8s.aws/instance-gpu-name is the lower-case GPU model without memory
# size ("a10g", "h100", "l40s", "t4"), https://karpenter.sh/docs/reference/instance-types/
KARPENTER_GPU_LABEL = "karpenter.k8s.aws/instance-gpu-name"
KNOWN_GPU_LABELS = (GFD_PRODUCT_LABEL, GKE_ACCELERATOR_LABEL, KARPENTER_GPU_LABEL)

# Kubernetes label syntax (apimachinery validation): a value, and a key with an optional prefix.
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def group_name(node_type: str) -> str:
    """The worker group name of a node type: its node-type label value, lower-cased."""
    name = re.sub(r"[^a-z0-9]+", "-", node_type_label_value(node_type).lower()).strip("-")
    if not name:
        raise K8sError(f"node type {node_type!r} gives no usable worker group name")
    return name


def gpu_label_values(gpu: GpuSpec, label_key: str = GFD_PRODUCT_LABEL,
                     overrides: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The node-label values that select nodes with this GPU under `label_key`'s scheme."""
    if overrides and gpu.name in overrides:
        return (overrides[gpu.name],)
    if label_key == GFD_PRODUCT_LABEL:
        values = tuple(dict.fromkeys(n.strip().replace(" ", "-") for n in gpu.nvml_names))
        if values:
            return values
    elif label_key == GKE_ACCELERATOR_LABEL and gpu.name in GKE_ACCELERATORS:
        return GKE_ACCELERATORS[gpu.name]
    elif label_key == KARPENTER_GPU_LABEL and not gpu.generic and not gpu.name.startswith("RTX"):
        return (gpu.name.split("-")[0].lower(),)
    known = (f"{label_key} has no value for {gpu.name} in rayquant's tables"
             if label_key in KNOWN_GPU_LABELS else f"{label_key} is not a label rayquant knows "
             f"(known: {', '.join(KNOWN_GPU_LABELS)})")
    raise K8sError(f"{known}. To fix: give the value your nodes carry, e.g. "
                   f"--gpu-value {gpu.name}=<label value> (see `kubectl get nodes -L {label_key}`)")
