"""What a cluster needs beyond the plan: names, image, storage, model cache, secrets, pod identity
and job policy (K8sOptions), each checked against Kubernetes' and KubeRay's rules with every problem
reported."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Mapping

from rayquant.k8s.errors import K8sError
from rayquant.k8s.labels import GFD_PRODUCT_LABEL, LABEL_VALUE, QUALIFIED_NAME

STORAGE_MOUNT_DIR = "/mnt/rayquant"
# HF_HOME on the PVC when --storage is one: every pod reads one copy of the model (huggingface_hub
# serializes downloads into a cache with lock files under it), and a retried job finds it there.
DEFAULT_MODEL_CACHE = STORAGE_MOUNT_DIR + "/huggingface"
# Env vars --storage-secret passes from the Secret (same key names): what pyarrow's S3 filesystem,
# which Ray Train writes s3:// storage through, reads. The last two are optional in the Secret.
STORAGE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
STORAGE_SECRET_OPTIONAL_KEYS = ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")
DEFAULT_RAY_VERSION = "2.60.0"  # the Ray the `train` extra pins (pyproject.toml)
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "SidecarMode")
STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
# KubeRay utils/constant.go: MaxRayClusterNameLength = 53 (63 minus "-serve-svc"); a RayJob's
# cluster name appends 6 characters, so MaxRayJobNameLength = 47.
MAX_RAYJOB_NAME = 47
MAX_RAYCLUSTER_NAME = 53
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# A Secret or ServiceAccount name: a DNS-1123 subdomain.
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
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

    @property
    def scheme(self) -> str | None:
        return self.uri.split("://", 1)[0].lower() if self.uri else None


def _is_object_name(name: str) -> bool:
    return bool(_DNS1123_SUBDOMAIN.match(name)) and len(name) <= 253


@dataclass(frozen=True)
class K8sOptions:
    """What the cluster needs beyond the plan: names, image, storage, secrets and job policy."""

    name: str
    image: str
    storage: str
    namespace: str = "default"
    hf_token_secret: str | None = None  # "NAME" or "NAME:KEY" (key defaults to HF_TOKEN)
    no_hf_token: bool = False  # a gated model rendered without a token (the user says so)
    model_cache: str | None = None  # HF_HOME on the PVC; None: DEFAULT_MODEL_CACHE with a PVC
    no_model_cache: bool = False  # each pod downloads the model into its own disk
    service_account: str | None = None  # serviceAccountName of every pod
    image_pull_secrets: tuple[str, ...] = ()  # Secrets of type dockerconfigjson
    storage_secret: str | None = None  # Secret with S3 credentials (STORAGE_SECRET_KEYS)
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
        object.__setattr__(self, "image_pull_secrets", tuple(self.image_pull_secrets))
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
        if self.no_hf_token and self.hf_token_secret is not None:
            problems.append("--no-hf-token and --hf-token-secret exclude each other")
        for flag, value in (("--service-account", self.service_account),
                            ("--storage-secret", self.storage_secret),
                            *(("--image-pull-secret", v) for v in self.image_pull_secrets)):
            if value is not None and not _is_object_name(value):
                problems.append(f"{flag} {value!r} is not a Kubernetes object name (lower-case "
                                "letters, digits, '-' and '.')")
        if len(set(self.image_pull_secrets)) != len(self.image_pull_secrets):
            problems.append("--image-pull-secret names a Secret twice")
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
            storage = Storage.parse(self.storage)
        except K8sError as e:
            problems.append(str(e))
        else:
            problems += self._storage_problems(storage)
        if problems:
            raise K8sError("cannot render manifests: " + "; ".join(problems))

    def _storage_problems(self, storage: Storage) -> list[str]:
        """What is wrong with the model cache and the storage Secret for this storage."""
        problems = []
        if self.model_cache is not None and self.no_model_cache:
            problems.append("--model-cache and --no-model-cache exclude each other")
        elif self.model_cache is not None and not storage.pvc:
            problems.append(f"--model-cache {self.model_cache}: the cache must be on a PVC every pod "
                            f"mounts, and --storage {self.storage} is a bucket. To fix: drop "
                            "--model-cache (each pod then downloads the model into its own disk, "
                            "its ephemeral-storage sized for it), or pass a ReadWriteMany PVC as --storage")
        elif self.model_cache is not None:
            path = posixpath.normpath(posixpath.join(STORAGE_MOUNT_DIR, self.model_cache))
            if ".." in self.model_cache.split("/") or not path.startswith(STORAGE_MOUNT_DIR + "/"):
                problems.append(f"--model-cache {self.model_cache!r} must be a directory on the PVC: "
                                f"a path relative to it (huggingface) or under {STORAGE_MOUNT_DIR}/")
        if self.storage_secret is not None and storage.scheme != "s3":
            problems.append(f"--storage-secret {self.storage_secret} gives S3 credentials, but "
                            f"--storage {self.storage} is not an s3:// bucket. To fix: drop "
                            "--storage-secret (a PVC needs none; for gs:// or abfss:// give the pods "
                            "a cloud identity with --service-account)")
        return problems

    @property
    def hf_home(self) -> str | None:
        """HF_HOME in the pods: the model cache on the PVC, or None (each pod's own disk)."""
        if self.no_model_cache or not Storage.parse(self.storage).pvc:
            return None
        if self.model_cache is None:
            return DEFAULT_MODEL_CACHE
        return posixpath.normpath(posixpath.join(STORAGE_MOUNT_DIR, self.model_cache))

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
