"""`rayquant k8s`: KubeRay manifests (rayquant.k8s) for a plan made by rayquant.planning from a
`rayquant train` config, or for a plan given."""

from __future__ import annotations

import click

from rayquant.cli.errors import flags_then_yaml, spell_with
from rayquant.k8s.labels import GFD_PRODUCT_LABEL
from rayquant.k8s.options import DEFAULT_RAY_VERSION, SUBMISSION_MODES

# The settings `rayquant k8s` takes as flags; the others come from the config and keep its keys.
K8S_FLAGS = {"model": "--model", "gpus": "--gpus", "output": "-o", "overwrite": "--overwrite"}


def _read_config(path: str) -> dict:
    import yaml

    from rayquant.k8s import K8sError

    from rayquant import yamlio

    try:
        with open(path, encoding="utf-8") as f:
            config = yamlio.safe_load(f)
    except OSError as e:
        raise K8sError(f"cannot read --config {path}: {e.strerror}. To fix: pass the `rayquant "
                       "train` YAML config to run (examples/quickstart.yaml is one)") from None
    except yaml.YAMLError as e:
        raise K8sError(f"--config {path} is not valid YAML: {e}\nTo fix: correct the YAML syntax "
                       "at the line shown") from None
    if not isinstance(config, dict):
        raise K8sError(f"--config {path} must hold a mapping (model, dataset, ...). To fix: see "
                       "examples/quickstart.yaml")
    return config


def _plan(config: dict, config_dir: str, model: str | None, gpus: str | None, inventory: str | None,
          plan_path: str | None):
    """The plan to render: loaded from --plan, or made (rayquant.planning) for the cluster --gpus /
    --inventory describes, for --model (default: the config's) and the config's lora/sft/calibration."""
    from planner.plan import TrainingPlan
    from rayquant import planning
    from rayquant.config import planning_config
    from rayquant.k8s import K8sError

    given = [flag for flag, value in (("--gpus", gpus), ("--inventory", inventory),
                                      ("--plan", plan_path)) if value]
    if len(given) != 1:
        raise click.UsageError(("--gpus, --inventory and --plan exclude each other (got "
                                + ", ".join(given) + ")" if given else "no cluster given")
                               + ". To fix: describe the cluster with --gpus 2x8xH100-80GB,4x1xA10G "
                               "or --inventory nodes.yaml, or pass a plan from `rayquant plan --json` "
                               "with --plan plan.json")
    model = model or config.get("model")
    if plan_path:
        plan = TrainingPlan.load(plan_path)
        if model and model != plan.model:
            raise K8sError(f"--plan {plan_path} is for {plan.model!r}, not {model!r}. To fix: "
                           "re-plan for this model or drop --model")
        return plan
    if not isinstance(model, str) or not model:
        raise K8sError("no model. To fix: pass --model or set `model:` in the config")
    lora, sft, calibration = planning_config(config, config_dir)
    return planning.make_plan(model, planning.node_types(gpus=gpus, inventory=inventory),
                              planning.job_spec(lora, sft), calibration=calibration)


def build_instructions() -> str:
    """What `rayquant k8s` says without --image: how to build and push the image the pods run."""
    return ("no --image: the pods need an image with Ray and rayquant[train]. Build it from a "
            "checkout of rayquant and push it to a registry your cluster pulls from:\n"
            "    docker build -f docker/Dockerfile -t REGISTRY/rayquant:0.1.0 .      "
            "# GPU nodes (docker/Dockerfile.cpu: CPU only)\n"
            "    docker push REGISTRY/rayquant:0.1.0\n"
            "To fix: pass --image REGISTRY/rayquant:0.1.0 (and --image-pull-secret SECRET for a "
            "private registry); see docs/kubernetes.md")


@click.command("k8s")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The `rayquant train` YAML config to run (mounted into the pods); its lora, sft "
                   "and calibration settings make the plan.")
@click.option("--image", default=None,
              help="Container image with Ray and rayquant[train] installed (docker/Dockerfile builds "
                   "one; without --image, how to build and push it is printed).")
@click.option("--model", default=None, help="Model id or path (default: the config's `model`).")
@click.option("--gpus", default=None, help="The cluster to plan for, e.g. 2x8xH100-80GB,4x1xA10G.")
@click.option("--inventory", type=click.Path(dir_okay=False), default=None,
              help="The cluster to plan for, as a YAML/JSON node list (see `rayquant inventory`).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="Use this plan (from `rayquant plan --json`) instead of planning.")
@click.option("--storage", required=True,
              help="Shared storage for checkpoints and the adapter: a ReadWriteMany PVC name "
                   "(mounted at /mnt/rayquant) or a URI such as s3://bucket/prefix.")
@click.option("--namespace", default="default", show_default=True, help="Kubernetes namespace.")
@click.option("--name", default=None, help="RayJob/RayCluster name (default: rayquant-<model>).")
@click.option("--hf-token-secret", default=None,
              help="Secret with the Hugging Face token, NAME or NAME:KEY (key default HF_TOKEN); "
                   "exposed to the pods as HF_TOKEN, never written into the manifest.")
@click.option("--no-hf-token", is_flag=True,
              help="Render a gated model (meta-llama/..., google/gemma-...) without --hf-token-secret: "
                   "the pods get it another way (a model cache holding it, HF_TOKEN set by the cluster).")
@click.option("--model-cache", default=None, metavar="PATH",
              help="HF_HOME on the PVC of --storage, relative to it or under /mnt/rayquant/ "
                   "(default with a PVC: /mnt/rayquant/huggingface): the model is downloaded once "
                   "for all pods and jobs.")
@click.option("--no-model-cache", is_flag=True,
              help="No model cache: each worker pod downloads the model into its own disk, its "
                   "ephemeral-storage request sized from the model's bytes (the default with a bucket "
                   "--storage).")
@click.option("--service-account", default=None,
              help="serviceAccountName of the head, worker and submitter pods (e.g. one bound to a "
                   "cloud identity for bucket access).")
@click.option("--image-pull-secret", "image_pull_secrets", multiple=True, metavar="SECRET",
              help="imagePullSecrets of every pod, for a private registry; repeatable.")
@click.option("--storage-secret", default=None, metavar="SECRET",
              help="Secret with S3 credentials for an s3:// --storage (keys AWS_ACCESS_KEY_ID, "
                   "AWS_SECRET_ACCESS_KEY; optional AWS_SESSION_TOKEN, AWS_ENDPOINT_URL), passed to the "
                   "head and workers as env vars of those names.")
@click.option("--gpu-label", default=GFD_PRODUCT_LABEL, show_default=True,
              help="Node label that names the GPU: GPU feature discovery's, or a cloud's such as "
                   "cloud.google.com/gke-accelerator or karpenter.k8s.aws/instance-gpu-name.")
@click.option("--gpu-value", "gpu_values", multiple=True, metavar="GPU=VALUE",
              help="The --gpu-label value of a GPU where rayquant's table lacks it "
                   "(e.g. A10G=nvidia-a10g); repeatable.")
@click.option("--dataset-in-pod", default=None,
              help="The dataset's path inside the pods (on the storage or in the image); default: "
                   "the config's local dataset travels in the ConfigMap (up to 512 KiB).")
@click.option("--pip", "pip_packages", multiple=True,
              help="Package the job's runtime_env installs (runtimeEnvYAML); repeatable.")
@click.option("--cluster", is_flag=True,
              help="Render a RayCluster for interactive use instead of a RayJob.")
@click.option("--submission-mode", type=click.Choice(SUBMISSION_MODES),
              default="K8sJobMode", show_default=True, help="How KubeRay submits the job.")
@click.option("--backoff-limit", type=click.IntRange(min=0), default=1, show_default=True,
              help="Retries of the whole job on a fresh cluster.")
@click.option("--deadline-hours", type=click.FloatRange(min=0, min_open=True), default=24.0,
              show_default=True, help="activeDeadlineSeconds: stop the job after this many hours.")
@click.option("--ttl-seconds", type=click.IntRange(min=0), default=600, show_default=True,
              help="Keep the finished cluster this long (ttlSecondsAfterFinished).")
@click.option("--ray-version", default=DEFAULT_RAY_VERSION, show_default=True,
              help="rayVersion of the cluster (the Ray the `train` extra pins).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the manifests here (atomically) instead of printing them.")
@click.option("--overwrite", is_flag=True,
              help="Replace an -o file that holds manifests rayquant rendered before (a file "
                   "rayquant did not write is never replaced).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary (worker groups, resources, entrypoint) instead of YAML.")
def k8s_command(config_path, image, model, gpus, inventory, plan_path, storage, namespace, name,
                hf_token_secret, no_hf_token, model_cache, no_model_cache, service_account,
                image_pull_secrets, storage_secret, gpu_label, gpu_values, dataset_in_pod,
                pip_packages, cluster, submission_mode, backoff_limit, deadline_hours, ttl_seconds,
                ray_version, output, overwrite, as_json) -> None:
    """Render KubeRay manifests from the plan: a ConfigMap (training config + plan) and a RayJob
    running `rayquant train` on it (a RayCluster with --cluster). One worker group per node type:
    replicas, nvidia.com/gpu, CPU and memory from the plan, a GPU node selector and toleration, and
    the rayquant.io/node-type Ray label the workers are pinned by. With a PVC the model is cached
    on it (HF_HOME); secrets, service account and pull secrets are references only.

    \b
    docker build -f docker/Dockerfile -t ghcr.io/acme/rayquant:0.1 . && docker push ghcr.io/acme/rayquant:0.1
    rayquant k8s --config train.yaml --gpus 2x8xH100-80GB --image ghcr.io/acme/rayquant:0.1 \\
        --image-pull-secret regcred --storage rayquant-pvc --hf-token-secret hf-token -o rayjob.yaml
    kubectl apply -f rayjob.yaml
    """
    import json
    import os

    from planner.atomic import check_output, write_atomically
    from rayquant import k8s

    spell_with(flags_then_yaml(K8S_FLAGS))
    if not image:
        raise click.UsageError(build_instructions())
    if output:
        check_output(output, overwrite=overwrite, what="manifest file")
    train_config = _read_config(config_path)
    config_dir = os.path.dirname(os.path.abspath(config_path))
    values = {}
    for item in gpu_values:
        gpu, sep, value = item.partition("=")
        if not sep or not gpu or not value:
            raise click.BadParameter(f"{item!r} must look like GPU=VALUE. To fix: e.g. --gpu-value "
                                     "A10G=a10g", param_hint="--gpu-value")
        values[gpu] = value
    plan = _plan(train_config, config_dir, model, gpus, inventory, plan_path)
    options = k8s.K8sOptions(
        name=name or k8s.default_name(plan.model), image=image, storage=storage,
        namespace=namespace, hf_token_secret=hf_token_secret, no_hf_token=no_hf_token,
        model_cache=model_cache, no_model_cache=no_model_cache, service_account=service_account,
        image_pull_secrets=image_pull_secrets, storage_secret=storage_secret, gpu_label=gpu_label,
        gpu_values=values, cluster=cluster, dataset_in_pod=dataset_in_pod,
        ray_version=ray_version, pip=pip_packages,
        submission_mode=submission_mode, backoff_limit=backoff_limit,
        active_deadline_seconds=max(1, round(deadline_hours * 3600)),
        ttl_seconds_after_finished=ttl_seconds)
    docs = k8s.render_manifests(plan, train_config, options, config_dir=config_dir)
    text = k8s.dump_yaml(docs)
    if output:
        write_atomically(output, text)
    summary = k8s.manifest_summary(docs)
    if as_json:
        click.echo(json.dumps({**summary, "output": output}, indent=2))
    elif output:
        click.echo(k8s.summary_text(summary) + f"\nwrote {output}; apply with: kubectl apply -f {output}")
    else:
        click.echo(text, nl=False)
    if image.startswith(("rayproject/ray:", "docker.io/rayproject/ray:")) and not pip_packages:
        click.echo(f"note: {image} has no rayquant installed; build the image of docker/Dockerfile "
                   "(docs/kubernetes.md) or add --pip 'rayquant[train]'", err=True)


COMMANDS = (k8s_command,)
