"""What a cluster needs beyond the plan: names, image, storage, secrets and job policy
(K8sOptions), each checked against Kubernetes' and KubeRay's rules with every problem reported."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from rayquant.k8s.errors import K8sError
from rayquant.k8s.labels import GFD_PRODUCT_LABEL, LABEL_VALUE, QUALIFIED_NAME

STORAGE_MOUNT_DIR = "/mnt/rayquant"
DEFAULT_RAY_VERSION = "2.60.0"  # the Ray the `train` extra pins (pyproject.toml)
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "SidecarMode")
STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
# KubeRay utils/constant.go: MaxRayClusterNameLength = 53 (63 minus "-serve-svc"); a RayJob's
# cluster name appends 6 characters, so MaxRayJobNameLength = 47.
MAX_RAYJOB_NAME = 47
MAX_RAYCLUSTER_NAME = 53
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
HF_TOKEN_PATTERN = re.compile(r"^hf_[A-Za-z0-9]{20,}$")  # a Hugging Face access token


@dataclass(frozen=True)
class Storage:
    """Where checkpoints and the adapter go: a PersistentVolumeClaim mounted on every pod, or a URI."""

    pvc: str | None = None
    uri: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Storage":
        text = text.strip()
        if "://" in text:
            scheme = text.split("://", 1)[0].lower()
            if scheme not in STORAGE_SCHEMES:
                raise K8sError(f"--storage {text}: scheme {scheme!r} is not shared storage Ray Train "
                               f"can write from every pod. To fix: use one of "
                               f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}, or a PVC name")
            return cls(uri=text.rstrip("/"))
        if not _DNS1123_LABEL.match(text) or len(text) > 253:
            raise K8sError(f"--storage {text!r} is neither a URI nor a valid PVC name (lower-case "
                           "letters, digits and '-'). To fix: pass an existing ReadWriteMany "
                           "PersistentVolumeClaim (--storage my-pvc) or a bucket URI "
                           "(--storage s3://bucket/prefix)")
        return cls(pvc=text)

    @property
    def storage_path(self) -> str:
        return self.uri if self.uri else STORAGE_MOUNT_DIR


@dataclass(frozen=True)
class K8sOptions:
    """What the cluster needs beyond the plan: names, image, storage, secrets and job policy."""

    name: str
    image: str
    storage: str
    namespace: str = "default"
    hf_token_secret: str | None = None  # "NAME" or "NAME:KEY" (key defaults to HF_TOKEN)
    gpu_label: str = GFD_PRODUCT_LABEL
    gpu_values: Mapping[str, str] = field(default_factory=dict)  # GPU catalog name -> label value
    cluster: bool = False  # render a RayCluster instead of a RayJob
    dataset_in_pod: str | None = None  # the dataset's path inside the pods; None: ship it
    ray_version: str = DEFAULT_RAY_VERSION
    pip: tuple[str, ...] = ()  # packages the job's runtime_env adds (runtimeEnvYAML)
    submission_mode: str = "K8sJobMode"
    backoff_limit: int = 1
    active_deadline_seconds: int = 24 * 3600
    ttl_seconds_after_finished: int = 600

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_values", dict(self.gpu_values))
        object.__setattr__(self, "pip", tuple(self.pip))
        problems: list[str] = []
        limit = MAX_RAYCLUSTER_NAME if self.cluster else MAX_RAYJOB_NAME
        if not _DNS1035_LABEL.match(self.name) or len(self.name) > limit:
            problems.append(f"--name {self.name!r} must be a DNS-1035 label of at most {limit} "
                            "characters (lower-case letters, digits, '-', starting with a letter)")
        if not _DNS1123_LABEL.match(self.namespace) or len(self.namespace) > 63:
            problems.append(f"--namespace {self.namespace!r} is not a valid namespace name")
        if not self.image.strip() or any(c.isspace() for c in self.image):
            problems.append(f"--image {self.image!r} must be a container image reference")
        if self.hf_token_secret is not None:
            secret, _, key = self.hf_token_secret.partition(":")
            if not _DNS1123_LABEL.match(secret) or len(secret) > 253:
                problems.append(f"--hf-token-secret {self.hf_token_secret!r}: {secret!r} is not a "
                                "Secret name (expected NAME or NAME:KEY)")
            if key and not re.match(r"^[-._A-Za-z0-9]+$", key):
                problems.append(f"--hf-token-secret {self.hf_token_secret!r}: {key!r} is not a "
                                "Secret key")
            if HF_TOKEN_PATTERN.match(secret) or HF_TOKEN_PATTERN.match(key):
                problems.append("--hf-token-secret takes the NAME of a Secret holding the token, "
                                "never the token itself")
        if not QUALIFIED_NAME.match(self.gpu_label):
            problems.append(f"--gpu-label {self.gpu_label!r} is not a Kubernetes label key")
        for gpu, value in self.gpu_values.items():
            if not LABEL_VALUE.match(value) or len(value) > 63:
                problems.append(f"--gpu-value {gpu}={value!r} is not a valid label value")
        if self.submission_mode not in SUBMISSION_MODES:
            problems.append(f"submission mode {self.submission_mode!r} is not one of "
                            f"{', '.join(SUBMISSION_MODES)}")
        for what, value, low in (("backoff limit", self.backoff_limit, 0),
                                 ("active deadline seconds", self.active_deadline_seconds, 1),
                                 ("TTL seconds after finished", self.ttl_seconds_after_finished, 0)):
            if value < low:
                problems.append(f"{what} must be >= {low}, got {value}")
        if self.dataset_in_pod is not None and not self.dataset_in_pod.startswith("/"):
            problems.append(f"--dataset-in-pod {self.dataset_in_pod!r} must be an absolute path "
                            "inside the pods")
        try:
            Storage.parse(self.storage)
        except K8sError as e:
            problems.append(str(e))
        if problems:
            raise K8sError("cannot render manifests: " + "; ".join(problems))

    @property
    def secret_ref(self) -> tuple[str, str] | None:
        if self.hf_token_secret is None:
            return None
        secret, _, key = self.hf_token_secret.partition(":")
        return secret, key or "HF_TOKEN"


def default_name(model: str) -> str:
    """A RayJob name from a model id: "meta-llama/Llama-3.1-8B" -> "rayquant-llama-3-1-8b"."""
    base = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-")
    return ("rayquant-" + base)[:MAX_RAYJOB_NAME].rstrip("-") if base else "rayquant"
