"""The rendered RayJob's entrypoint runs for real: a local Ray head stands in for the KubeRay
cluster and the job is submitted with `ray job submit`, as KubeRay's submitter pod does.

What Kubernetes would do is simulated as directly as possible: the ConfigMap's files are written
where the pods mount them (the mount path is mapped into a temp dir), the PVC is a temp dir, and
the head node is started with the Ray labels and CPUs of the rendered worker group. The training
runs on CPU against the tiny model and must write its adapter to the shared storage.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rayquant import k8s
from rayquant.cli import main

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter
# A guard against a hung cluster, not a performance limit.
HANG_GUARD_S = 1800


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _train_command_available() -> bool:
    return "train" in main.commands


def _dashboard_missing() -> str | None:
    """Why `ray job submit` cannot work here: the job server lives in Ray's dashboard, which
    needs ray[default]'s packages (aiohttp_cors, grpcio, opencensus, opentelemetry, ...)."""
    from ray._private.utils import get_dashboard_dependency_error

    error = get_dashboard_dependency_error()
    return None if error is None else f"ray[default] is not installed ({error})"


def _rayquant_on_path(bin_dir: Path) -> str:
    """A directory whose `rayquant` runs this interpreter's rayquant (what the image provides)."""
    script = Path(sys.executable).parent / "rayquant"
    if script.exists():
        return str(script.parent)
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "rayquant"
    shim.write_text(f"#!{sys.executable}\nfrom rayquant.cli import main\nmain()\n")
    shim.chmod(0o755)
    return str(bin_dir)


@pytest.fixture
def ray_head(tmp_path_factory):
    """Starts a Ray head (token auth, its own ports and temp dir) and yields a function that
    configures it: (labels, num_cpus) -> (dashboard_url, env). Stops only the processes it started."""
    # Unix socket paths must stay short: a temp dir directly under /tmp.
    temp_dir = Path(tmp_path_factory.mktemp("rq", numbered=True))
    short = Path(f"/tmp/rqk8s-{os.getpid()}-{secrets.token_hex(3)}")
    short.mkdir()
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
           "PATH": f"{_rayquant_on_path(temp_dir / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAYQUANT_CACHE": str(temp_dir / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_USAGE_STATS_ENABLED": "0"}
    started: list[subprocess.Popen] = []

    def start(labels: dict[str, str], num_cpus: int) -> tuple[str, dict]:
        gcs, dash, agent, node_mgr, obj_mgr, metrics, agent_grpc, rt_env = _free_ports(8)
        label_arg = ",".join(f"{k}={v}" for k, v in labels.items())
        cmd = [*RAY, "start", "--head", "--block", f"--port={gcs}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
               f"--dashboard-agent-listen-port={agent}",
               f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
               f"--metrics-export-port={metrics}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={rt_env}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--labels={label_arg}", f"--temp-dir={short}", "--disable-usage-stats"]
        log = open(temp_dir / "ray-start.log", "w")
        started.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True))
        url = f"http://127.0.0.1:{dash}"
        request = urllib.request.Request(f"{url}/api/jobs/",
                                         headers={"Authorization": f"Bearer {token_path.read_text()}"})
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                if started[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray head did not start:\n" + (temp_dir / "ray-start.log").read_text())
                time.sleep(1)
        return url, env

    try:
        yield start
    finally:
        for proc in started:
            # `ray start --block` stops its node's processes on SIGTERM, gracefully and slowly (~30 s);
            # the test's node keeps nothing worth a graceful stop, so after a few seconds the group
            # is killed (and the leftovers below by their temp dir).
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _kill_leftovers(str(short))
        shutil.rmtree(short, ignore_errors=True)


def _kill_leftovers(marker: str) -> None:
    """Processes of this test's Ray node (their command lines name its temp dir), by pid."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _mount_configmap(configmap: dict, mount_dir: Path, storage_dir: Path) -> None:
    """Write the ConfigMap's keys as files, as the kubelet's volume mount does; paths inside the
    pods (/etc/rayquant, /mnt/rayquant) map to this machine's temp dirs."""
    mount_dir.mkdir(parents=True)
    for key, text in configmap.get("data", {}).items():
        text = text.replace(k8s.CONFIG_MOUNT_DIR, str(mount_dir)).replace(
            k8s.STORAGE_MOUNT_DIR, str(storage_dir))
        (mount_dir / key).write_text(text)
    for key, b64 in configmap.get("binaryData", {}).items():
        (mount_dir / key).write_bytes(base64.b64decode(b64))


@pytest.mark.ray
@pytest.mark.skipif(not _train_command_available(),
                    reason="`rayquant train` is not in the CLI yet (the trainer's command)")
@pytest.mark.skipif(_dashboard_missing() is not None,
                    reason=f"`ray job submit` needs Ray's dashboard: {_dashboard_missing()}")
def test_rendered_rayjob_entrypoint_trains_and_writes_the_adapter(tmp_path, ray_head):
    rows = [{"text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}."} for i in range(32)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "model": "rayquant/tiny-llama", "dataset": "train.jsonl",
        "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]},
        "sft": {"seq_len": 64, "global_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3}}))
    out = tmp_path / "rayjob.yaml"
    result = CliRunner().invoke(main, ["k8s", "--config", str(tmp_path / "train.yaml"),
                                       "--gpus", "1x1xCPU", "--image", "registry.example.com/rq:1",
                                       "--storage", "rayquant-pvc", "--name", "tiny-job",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    configmap, job = yaml.safe_load_all(out.read_text())
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]

    mount_dir, storage_dir = tmp_path / "etc-rayquant", tmp_path / "pvc"
    storage_dir.mkdir()
    _mount_configmap(configmap, mount_dir, storage_dir)
    entrypoint = job["spec"]["entrypoint"].replace(k8s.CONFIG_MOUNT_DIR, str(mount_dir))
    cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    url, env = ray_head(group["labels"], cpus)

    submit = [*RAY, "job", "submit", "--address", url, "--submission-id", "tiny-job-1"]
    if "runtimeEnvYAML" in job["spec"]:
        submit += ["--runtime-env-json", json.dumps(yaml.safe_load(job["spec"]["runtimeEnvYAML"]))]
    proc = subprocess.run([*submit, "--", *shlex.split(entrypoint)], env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-6000:]
    status = subprocess.run([*RAY, "job", "status", "--address", url, "tiny-job-1"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr

    # The adapter lands on the shared storage: <storage_path>/<run name = job name>/adapter.
    adapter = storage_dir / "tiny-job" / "adapter"
    assert (adapter / "adapter_config.json").is_file(), (
        f"no adapter at {adapter}; found {sorted(map(str, storage_dir.rglob('*')))[:20]}\n{logs[-4000:]}")
    assert any(adapter.glob("adapter_model.*"))
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["plan"]["model"] == "rayquant/tiny-llama"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
