"""KubeRay manifests rendered from a TrainingPlan: a ConfigMap (training config + plan JSON) and a
`ray.io/v1` RayJob (or a RayCluster for interactive use).

The head group has no GPUs. Each NodePlan becomes one worker group: one pod per node holding all of
that node's GPUs, pinned to the GPU product with a node selector, carrying the Ray node label
`rayquant.io/node-type=<node_type_label_value(node_type)>` that rayquant's worker placement selects
on (Ray also labels the node `ray.io/accelerator-type` and adds the `accelerator_type:<TYPE>` resource
by itself from NVML). Usage:

    docs = render_manifests(plan, train_config, K8sOptions(name="ft", image="my/image:tag",
                                                         storage="rayquant-pvc"))
    planner.atomic.write_atomically("rayjob.yaml", dump_yaml(docs))

Modules: `labels` (GPU label values per labelling scheme, the node-type label), `sizing` (pod CPUs,
memory and disk from the plan and the model's checkpoint bytes), `options` (K8sOptions: names,
image, storage, model cache, secrets, service account and pull secrets, job policy), `render` (the
manifests, their YAML, a summary). The plan itself comes from rayquant.planning.
"""

from rayquant.k8s.errors import K8sError
from rayquant.k8s.labels import (GFD_PRODUCT_LABEL, GKE_ACCELERATOR_LABEL, KARPENTER_GPU_LABEL, NODE_TYPE_LABEL,
                                 gpu_label_values, node_type_label_value)
from rayquant.k8s.options import (DEFAULT_MODEL_CACHE, DEFAULT_RAY_VERSION, STORAGE_MOUNT_DIR, K8sOptions, Storage,
                                  default_name)
from rayquant.k8s.render import (CONFIG_MOUNT_DIR, DATASET_EMBED_LIMIT_BYTES, PLAN_FILE, TRAIN_CONFIG_FILE,
                                 dump_yaml, entrypoint, manifest_summary, mounted_config, render_manifests,
                                 summary_text)
from rayquant.k8s.sizing import (WORKER_PROCESS_BYTES, PodSize, checkpoint_bytes, head_pod_size,
                                 worker_ephemeral_terms, worker_pod_size)

__all__ = ["CONFIG_MOUNT_DIR", "DATASET_EMBED_LIMIT_BYTES", "DEFAULT_MODEL_CACHE", "DEFAULT_RAY_VERSION", "GFD_PRODUCT_LABEL",
           "GKE_ACCELERATOR_LABEL", "KARPENTER_GPU_LABEL", "K8sError", "K8sOptions", "NODE_TYPE_LABEL",
           "PLAN_FILE", "PodSize", "STORAGE_MOUNT_DIR", "Storage", "TRAIN_CONFIG_FILE",
           "WORKER_PROCESS_BYTES", "checkpoint_bytes", "default_name", "dump_yaml", "entrypoint", "gpu_label_values",
           "head_pod_size", "manifest_summary", "mounted_config", "node_type_label_value",
           "render_manifests", "summary_text", "worker_ephemeral_terms", "worker_pod_size"]
