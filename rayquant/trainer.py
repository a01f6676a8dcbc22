"""RayQuantTrainer: plan, then fine-tune with Unsloth + TRL on Ray Train workers, and gather the
adapters into one PEFT directory with a manifest.

    from rayquant import RayQuantTrainer
    trainer = RayQuantTrainer(model="rayquant/tiny-llama", dataset="examples/data/tiny_alpaca.jsonl",
                              sft={"seq_len": 128, "global_batch_size": 8, "max_steps": 30},
                              scaling={"num_workers": 2})
    print(trainer.plan().to_json())   # dry run: reads configs only, loads no weights
    result = trainer.fit()            # result.adapter_dir, result.manifest, result.metrics
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from planner.atomic import write_atomically
from planner.hardware import CPU_DEVICE
from planner.plan import JobSpec, TrainingPlan
from rayquant.config import ConfigError, LoraOptions, RunOptions, ScalingOptions, SftOptions, coerce_options

TINY_MODEL_PREFIX = "rayquant/tiny-"
TINY_VOCAB_SIZE = 256  # rayquant.tiny.train_tokenizer's vocab_size
DEFAULT_CPU_WORKERS = 2
REPORT_POLL_INTERVAL_S = "0.2"
# Environment the workers need to stay offline and quiet; forwarded when set on the driver.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME",
                  "TOKENIZERS_PARALLELISM", "UNSLOTH_DISABLE_CPU_FALLBACK", "RAYQUANT_CACHE")


def cache_dir() -> Path:
    return Path(os.environ.get("RAYQUANT_CACHE", "~/.cache/rayquant")).expanduser()


def tiny_arch(model: str) -> str | None:
    """'rayquant/tiny-llama' -> 'llama'; None for any other model id."""
    return model[len(TINY_MODEL_PREFIX):] if model.startswith(TINY_MODEL_PREFIX) else None


def resolve_model(model: str) -> str:
    """A local directory for `model`: tiny ids are built offline into the cache (once); local
    paths are returned as they are; anything else is a hub id for from_pretrained."""
    arch = tiny_arch(model)
    if arch is not None:
        from rayquant.tiny import make_tiny_model

        return str(make_tiny_model(cache_dir() / "models" / f"tiny-{arch}", arch=arch))
    return model


def _model_config_path(model: str) -> str:
    """A path load_model_spec can read without building the model (tiny ids: their config)."""
    arch = tiny_arch(model)
    if arch is None:
        return model
    built = cache_dir() / "models" / f"tiny-{arch}"
    if (built / "config.json").exists():
        return str(built)
    from rayquant.tiny import TINY_CONFIGS

    cfg = dict(TINY_CONFIGS[arch], vocab_size=TINY_VOCAB_SIZE, torch_dtype="bfloat16")
    tmp = Path(tempfile.mkdtemp(prefix="rayquant-tiny-config-")) / f"tiny-{arch}"
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(cfg))
    return str(tmp)


def init_ray(address: str | None = None) -> None:
    """Connect to Ray at `address` (None: RAY_ADDRESS, else start a local cluster), unless connected."""
    import ray

    if ray.is_initialized():
        return
    # Ray Train's controller polls each worker's one-slot result queue every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and ray.train.report blocks until then:
    # with a report per logging step, that interval would pace training (measured: 2 s/step).
    interval = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)
    # "local": a new cluster, never a `ray start` cluster that happens to run on this machine
    # (to use one, pass its address or "auto").
    ray.init(address=address or "local", logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval}})


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path  # PEFT adapter (PeftModel.from_pretrained) + manifest.json
    manifest: Mapping[str, Any]
    metrics: Mapping[str, Any]  # final metrics of rank 0, and run totals
    plan: TrainingPlan
    run_dir: Path  # Ray Train's storage for this run (checkpoints)


@dataclass
class _Resolved:
    lora: LoraOptions
    sft: SftOptions
    scaling: ScalingOptions
    run: RunOptions
    extra: dict = field(default_factory=dict)


class RayQuantTrainer:
    """Fine-tune `model` on `dataset` with LoRA/QLoRA over a Ray cluster, as the plan says.

    model:   hub id, local directory, or `rayquant/tiny-llama` / `rayquant/tiny-qwen2` (built offline)
    dataset: datasets.Dataset, ray.data.Dataset, list of dicts, or a JSON/JSONL/Parquet path
    plan:    "auto" (plan for the cluster), a TrainingPlan, or a path to a plan JSON
    lora, sft, scaling, run: mappings or rayquant.config.*Options (see their fields)
    address: Ray address; None: RAY_ADDRESS, else a local cluster started by ray.init()
    All problems with the arguments are reported together in one ConfigError.
    """

    def __init__(self, *, model: str, dataset: Any, plan: str | TrainingPlan = "auto",
                 lora: Mapping | LoraOptions | None = None, sft: Mapping | SftOptions | None = None,
                 scaling: Mapping | ScalingOptions | None = None, run: Mapping | RunOptions | None = None,
                 address: str | None = None) -> None:
        problems: list[str] = []
        if not isinstance(model, str) or not model:
            problems.append(f"model must be a hub id, a local directory or rayquant/tiny-llama, got {model!r}")
        elif tiny_arch(model) is not None:
            from rayquant.tiny import TINY_CONFIGS

            if tiny_arch(model) not in TINY_CONFIGS:
                problems.append(f"model {model!r}: tiny models are "
                                f"{', '.join(TINY_MODEL_PREFIX + a for a in TINY_CONFIGS)}")
        if dataset is None:
            problems.append("dataset is required: a datasets.Dataset, ray.data.Dataset or JSON/JSONL/Parquet path")
        elif isinstance(dataset, (str, os.PathLike)) and not os.path.exists(os.path.expanduser(str(dataset))):
            problems.append(f"dataset {dataset} does not exist; pass a JSON, JSONL or Parquet file")
        if isinstance(plan, str) and plan != "auto" and not os.path.exists(plan):
            problems.append(f"plan file {plan} does not exist; pass plan='auto' or write one with "
                            f"`rayquant plan ... --json`")
        elif not isinstance(plan, (str, TrainingPlan)):
            problems.append(f"plan must be 'auto', a TrainingPlan or a path, got {type(plan).__name__}")
        if address is not None and not isinstance(address, str):
            problems.append(f"address must be a Ray address string, got {address!r}")
        opts = {name: coerce_options(name, value, problems)
                for name, value in (("lora", lora), ("sft", sft), ("scaling", scaling), ("run", run))}
        for o in opts.values():
            problems.extend(o.problems())
        if problems:
            raise ConfigError(problems, "RayQuantTrainer arguments")
        self.model = model
        self.dataset = dataset
        self._plan_arg = plan
        self.address = address
        self.options = _Resolved(**opts)
        self._plan: TrainingPlan | None = None

    # -- planning -------------------------------------------------------------------------------
    def job_spec(self) -> JobSpec:
        lora, sft = self.options.lora, self.options.sft
        return JobSpec(seq_len=sft.seq_len, global_batch_size=sft.global_batch_size, lora_rank=lora.rank,
                       lora_alpha=lora.effective_alpha, lora_dropout=lora.dropout, lora_targets=lora.targets,
                       prefer=sft.prefer, backend=sft.backend, quantization=sft.quantization,
                       optimizer=sft.optimizer, micro_batch_size=sft.micro_batch_size,
                       gradient_checkpointing=sft.gradient_checkpointing)

    def _ray_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def node_types(self):
        """The cluster to plan for: scaling.gpus, else the Ray cluster at the address, else this machine
        (a CPU-only machine is one node of `num_workers` CPU worker slots)."""
        from planner.hardware import NodeType, cpu_device, parse_gpu_spec

        scaling = self.options.scaling
        if scaling.gpus:
            return parse_gpu_spec(scaling.gpus)
        if self._ray_address():
            from rayquant.inventory import discover_node_types

            return discover_node_types(self._ray_address())
        from planner.host import host_memory_bytes
        from rayquant.inventory import host_cpus, local_node_types

        local = local_node_types()
        if any(not nt.gpu.is_cpu for nt in local):
            return local
        workers = scaling.num_workers or DEFAULT_CPU_WORKERS
        return (NodeType(gpu=cpu_device(host_memory_bytes()), gpus_per_node=workers, count=1,
                         host_memory_bytes=host_memory_bytes(), cpus_per_node=host_cpus()),)

    def plan(self) -> TrainingPlan:
        """The TrainingPlan (a dry run: reads model configs and the cluster, loads no weights)."""
        if self._plan is not None:
            return self._plan
        if isinstance(self._plan_arg, TrainingPlan):
            self._plan = self._plan_arg
        elif self._plan_arg != "auto":
            self._plan = TrainingPlan.load(self._plan_arg)
        else:
            from planner.model import load_model_spec

            spec = load_model_spec(_model_config_path(self.model))
            node_types = self.node_types()
            from planner.search import make_plan

            plan = make_plan(spec, node_types, self.job_spec())
            import dataclasses

            self._plan = dataclasses.replace(plan, model=self.model)
        return self._plan

    # -- training -------------------------------------------------------------------------------
    def prepare_data(self):
        """Load and check the dataset (every row; DatasetError lists the bad ones), normalized."""
        from rayquant.data import prepare

        sft = self.options.sft
        return prepare(self.dataset, sft.dataset_format, sft.text_field, shuffle_seed=sft.seed)

    def _training_problems(self, plan: TrainingPlan, num_rows: int) -> tuple[list[str], int]:
        from rayquant.data import steps_per_epoch

        problems = []
        for attr in ("optimizer", "backend"):
            values = {getattr(p, attr) for p in plan.node_plans}
            if len(values) > 1:
                problems.append(f"the plan's node types use different {attr}s ({', '.join(sorted(values))}); "
                                f"DDP needs one, so every rank applies the same update. Pin it "
                                f"(sft.{attr}) and re-plan")
        per_rank = [plan.for_rank(r)[1].samples_per_step for r in range(plan.num_workers)]
        epoch_steps = steps_per_epoch(num_rows, per_rank)
        if epoch_steps < 1:
            problems.append(f"the dataset has {num_rows} rows, fewer than one global batch of "
                            f"{sum(per_rank)}; add rows or lower sft.global_batch_size")
        sft = self.options.sft
        total = sft.max_steps or max(1, math.ceil(sft.num_epochs * max(epoch_steps, 1)))
        return problems, total

    def _run_name(self) -> str:
        if self.options.run.name:
            return self.options.run.name
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.model.rstrip("/").split("/")[-1])
        return f"rayquant-{base}-{time.strftime('%Y%m%d-%H%M%S')}"

    def fit(self) -> TrainResult:
        """Train on Ray and return the gathered adapter; data problems are raised before Ray starts."""
        data = self.prepare_data()
        plan = self.plan()
        check_plan_runs(plan, self.options.scaling.cpus_per_worker)
        problems, total_steps = self._training_problems(plan, data.num_rows)
        if problems:
            raise ConfigError(problems, "training setup")
        run = self.options.run
        name = self._run_name()
        storage = Path(run.storage_path).expanduser().resolve()
        run_dir = storage / name
        if (run_dir / FINISHED_MARKER).exists() or (run_dir / "adapter" / "manifest.json").exists():
            # A finished run of that name: Ray Train would restore its final checkpoint; start a new
            # run beside it. An unfinished one is resumed (rerunning the command continues it).
            name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = storage / name
        dest = Path(run.output_dir).expanduser() if run.output_dir else run_dir / "adapter"
        from rayquant.adapters import check_adapter_output

        check_adapter_output(dest, run.overwrite)  # refuse a user's folder now, not after training

        import ray
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from rayquant.adapters import build_manifest, gather, write_adapter_dir
        from rayquant.progress import ProgressPrinter

        model_path = resolve_model(self.model)  # build tiny models once here, not in every worker
        if data.format == "messages":  # fail here, not in every worker, if the template cannot mask turns
            from transformers import AutoTokenizer

            from rayquant.data import check_chat_template

            try:
                tokenizer = AutoTokenizer.from_pretrained(model_path)
            except OSError:  # not readable from the driver (a hub id offline): the workers check
                tokenizer = None
            if tokenizer is not None:
                check_chat_template(tokenizer, self.model)
        init_ray(self._ray_address())
        scaling_kwargs = self._scaling_kwargs(plan)
        fail_at = int(os.environ.get("RAYQUANT_FAIL_AT_STEP", "0") or 0)
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["RAYQUANT_BACKEND"] = plan.node_plans[0].backend
        # Ray Train routes workers' print() to a logger, which leaks the disassembly dill prints
        # into a captured stdout while `datasets` fingerprints TRL's map functions.
        env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
        config = {
            "plan": plan.to_dict(), "model": self.model, "model_path": None, "format": data.format,
            "data_ref": ray.put(data.dataset), "sft": asdict(self.options.sft), "seq_len": plan.job.seq_len,
            "total_steps": total_steps, "global_batch_size": plan.global_batch_size,
            "world_size": plan.num_workers, "checkpoint_every_steps": run.checkpoint_every_steps, "env": env,
            # Each worker re-checks that it landed where its selector says (rayquant.placement).
            "label_selectors": scaling_kwargs.get("label_selector"),
            "fail_at_step": fail_at or None,
            "fail_rank": int(os.environ.get("RAYQUANT_FAIL_RANK", plan.num_workers - 1)),
            "fail_marker": str(run_dir / ".rayquant-fault-injected") if fail_at else None,
        }
        print(f"[rayquant] training {self.model}: {plan.num_workers} workers, {total_steps} steps of "
              f"{plan.global_batch_size} sequences, run {name} in {storage}", flush=True)
        trainer = TorchTrainer(
            _train_loop, train_loop_config=config, scaling_config=ScalingConfig(**scaling_kwargs),
            run_config=RunConfig(
                name=name, storage_path=str(storage),
                checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
                failure_config=FailureConfig(max_failures=run.max_failures),
                callbacks=[ProgressPrinter()], logging_config=LoggingConfig(log_level="WARNING"),
                worker_runtime_env={"env_vars": env,
                                    "worker_process_setup_hook": "rayquant.worker.import_unsloth_first"}))
        t0 = time.perf_counter()
        result = trainer.fit()
        wall_s = time.perf_counter() - t0
        if result.checkpoint is None:
            raise RuntimeError(f"the run {name} ended without the final adapters; see {run_dir}")
        with result.checkpoint.as_directory() as merged:
            gathered = gather(merged, plan.num_workers)
            manifest = build_manifest(plan.to_dict(), gathered, {
                "run": {"name": name, "storage_path": str(run_dir), "steps": total_steps,
                        "fit_wall_s": wall_s, "dataset_rows": data.num_rows, "dataset_format": data.format,
                        "ray_address": self._ray_address() or "local"},
                "sft": asdict(self.options.sft)})
            adapter_dir = write_adapter_dir(gathered.adapter_dir, manifest, dest, overwrite=run.overwrite)
        write_atomically(run_dir / FINISHED_MARKER,
                         json.dumps({"adapter_dir": str(adapter_dir), "steps": total_steps}, indent=2))
        metrics = dict(result.metrics or {}, fit_wall_s=wall_s)
        print(f"[rayquant] adapter written to {adapter_dir}", flush=True)
        return TrainResult(adapter_dir=adapter_dir, manifest=manifest, metrics=metrics, plan=plan,
                           run_dir=run_dir)

    def _scaling_kwargs(self, plan: TrainingPlan) -> dict[str, Any]:
        from rayquant.placement import resources_per_worker, scaling_config_kwargs

        cpus = self.options.scaling.cpus_per_worker
        if self._ray_address() is None and all(p.gpu == CPU_DEVICE for p in plan.node_plans):
            # The local machine is the whole cluster: no labels to pin by.
            return {"num_workers": plan.num_workers, "use_gpu": False,
                    "resources_per_worker": resources_per_worker(plan, cpus)}
        from rayquant.inventory import discover_node_types

        return scaling_config_kwargs(plan, discover_node_types(self._ray_address()), cpus_per_worker=cpus)


def check_plan_runs(plan: TrainingPlan, cpus_per_worker: int = 1) -> None:
    """Refuse, before Ray starts, a plan that Ray Train or DeepSpeed cannot run as one job: ZeRO-3
    node plans that cannot form one ZeRO group, or node types whose workers need different GPU
    counts (Ray Train reserves one bundle shape for all workers). Raises PlanError with a fix."""
    from rayquant.placement import resources_per_worker
    from rayquant.zero import check_zero3_plan

    check_zero3_plan(plan)
    resources_per_worker(plan, cpus_per_worker)


FINISHED_MARKER = "rayquant_finished.json"  # in the run dir: its final checkpoint holds adapters only


def _train_loop(config: dict) -> None:
    # Imported in the worker: the driver needs neither unsloth nor a GPU.
    import logging

    from rayquant.worker import train_loop_per_worker

    # Ray Train logs every report at INFO on every rank, which drowns the driver's progress lines.
    # Its logger is named after the module's file (ray 2.60: logging.getLogger(__file__)).
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)

    config = dict(config, model_path=resolve_model(config["model"]))
    train_loop_per_worker(config)

