"""RayQuantTrainer: plan, then fine-tune with Unsloth + TRL on Ray Train workers, and gather the
adapters into one PEFT directory with a manifest.

    from rayquant import RayQuantTrainer
    trainer = RayQuantTrainer(model="rayquant/tiny-llama", dataset="examples/data/tiny_alpaca.jsonl",
                              sft={"seq_len": 128, "global_batch_size": 8, "max_steps": 30},
                              scaling={"num_workers": 2})
    print(trainer.plan().to_json())   # dry run: reads the model's config and the cluster, no weights
    result = trainer.fit()            # result.adapter_dir, result.manifest, result.metrics

Planning goes through rayquant.planning, as `rayquant plan` and `rayquant k8s` do; Ray is joined
through rayquant.cluster.connect. Errors that name settings spell them as this class's arguments
(sft={"seq_len": ...}).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from planner.atomic import write_atomically
from planner.hardware import CPU_DEVICE
from planner.plan import JobSpec, TrainingPlan
from planner.replan import NothingCheaperError
from planner.vocab import SettingError
from rayquant import planning, quiet
from rayquant.cluster import actor_runtime_env, connect, ray_address
from rayquant.config import (ConfigError, LoraOptions, RunOptions, ScalingOptions, SftOptions, address_problems,
                             calibration_problems, coerce_options, data_problems, plan_problems,
                             python_spelling, render_options)
from rayquant.models import model_problems, resolve_model, tiny_arch

# Environment the workers need to reach (or stay off) the Hub and stay quiet; forwarded when set on
# the driver. HF_TOKEN reaches the workers through Ray's runtime env, never a log line.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                  "HF_TOKEN", "HF_ENDPOINT", "TOKENIZERS_PARALLELISM", "UNSLOTH_DISABLE_CPU_FALLBACK",
                  "RAYQUANT_CACHE", "RAYQUANT_VERBOSE")


# How long a worker's death may take to show as its node's death in Ray's node table (Ray marks a
# node dead after its health checks fail; a node removed on purpose shows within a second or two).
NODE_DEATH_WAIT_S = 30.0


class RunFaultError(RuntimeError):
    """A fault the run could not survive (rayquant.restarts): a failed run. The message names
    settings and options as {placeholders} ({seq_len}, {run.max_replans}), which `render` spells
    per face (str(): neutral names and option paths)."""

    def __init__(self, message: str) -> None:
        self.template = message
        super().__init__(render_options(message))

    def render(self, spell=None) -> str:
        return render_options(self.template, spell)


class RunOutOfMemoryError(RunFaultError):
    """A worker ran out of memory with nothing cheaper left to re-plan to."""


class RunRestartsSpentError(RunFaultError):
    """The run needed another re-plan (out of memory, a lost node) than run.max_replans allows."""


class TrainedNothingError(RuntimeError):
    """The run finished but trained nothing (no optimizer step, a non-finite loss): a failed run,
    whose adapter is not published."""


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


def _python_spelling(method):
    """Errors that name settings ({seq_len}) leave the trainer spelled as its arguments name them
    (sft={"seq_len": ...}); the template stays, so a face wrapping the trainer (`rayquant train`)
    can render its own spelling."""
    @functools.wraps(method)
    def spelled(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except SettingError as e:
            e.args = (e.render(python_spelling),)
            raise

    return spelled


class RayQuantTrainer:
    """Fine-tune `model` on `dataset` with LoRA/QLoRA over a Ray cluster, as the plan says.

    model:   catalog or Hub id, local directory, or `rayquant/tiny-llama` / `rayquant/tiny-qwen2` (built offline)
    dataset: datasets.Dataset, ray.data.Dataset, list of dicts, a JSON/JSONL/Parquet path, a local
             directory of data files, or a Hub dataset id; dataset_split / dataset_subset pick its
             split and config (rayquant.data)
    eval_dataset: evaluation rows in the same forms (eval_dataset_split / eval_dataset_subset), or
             sft={"eval_fraction": ...} holds some of `dataset` out
    plan:    "auto" (plan for the cluster), a TrainingPlan, or a path to a plan JSON
    lora, sft, scaling, run: mappings or rayquant.config.*Options (see their fields)
    address: Ray address; None: RAY_ADDRESS, else a local cluster (rayquant.cluster.connect)
    calibration: a `rayquant calibrate` file the plan applies (with plan="auto")
    callbacks: transformers TrainerCallback instances (or classes) added to every worker's
             SFTTrainer, as `SFTTrainer(callbacks=...)` takes them; they travel to the workers
             pickled (cloudpickle), so they must not hold locks, open files or GPU tensors
    All problems with the arguments are reported together in one ConfigError.
    """

    @_python_spelling
    def __init__(self, *, model: str, dataset: Any, plan: str | TrainingPlan = "auto",
                 lora: Mapping | LoraOptions | None = None, sft: Mapping | SftOptions | None = None,
                 scaling: Mapping | ScalingOptions | None = None, run: Mapping | RunOptions | None = None,
                 address: str | None = None, calibration: str | None = None,
                 dataset_split: str | None = None, dataset_subset: str | None = None,
                 eval_dataset: Any = None, eval_dataset_split: str | None = None,
                 eval_dataset_subset: str | None = None, callbacks: Sequence[Any] | None = None) -> None:
        problems = (model_problems(model) + plan_problems(plan)
                    + calibration_problems(calibration, plan) + address_problems(address)
                    + callback_problems(callbacks))
        opts = {name: coerce_options(name, value, problems)
                for name, value in (("lora", lora), ("sft", sft), ("scaling", scaling), ("run", run))}
        for o in opts.values():
            problems.extend(o.problems())
        problems += data_problems(dataset, dataset_split, dataset_subset, eval_dataset, eval_dataset_split,
                                  eval_dataset_subset, sft=opts["sft"])
        if problems:
            raise ConfigError(problems, "RayQuantTrainer arguments",
                              "correct these arguments (see help(RayQuantTrainer) and rayquant.config)")
        self.model = model
        self.dataset = dataset
        self.dataset_split, self.dataset_subset = dataset_split, dataset_subset
        self.eval_dataset = eval_dataset
        self.eval_dataset_split, self.eval_dataset_subset = eval_dataset_split, eval_dataset_subset
        self._plan_arg = plan
        self.address = address
        self.calibration = calibration
        self.options = _Resolved(**opts)
        self.callbacks = tuple(callbacks or ())
        self._plan: TrainingPlan | None = None

    # -- planning (rayquant.planning, as `rayquant plan` and `rayquant k8s` plan) ----------------
    def job_spec(self) -> JobSpec:
        return planning.job_spec(self.options.lora, self.options.sft)

    def _ray_address(self) -> str | None:
        return ray_address(self.address)

    def node_types(self):
        """The cluster to plan for: scaling.gpus, else the Ray cluster at the address, else this machine
        (a CPU-only machine is one node of `num_workers` CPU worker slots)."""
        scaling = self.options.scaling
        return planning.node_types(gpus=scaling.gpus, address=self._ray_address(),
                                   cpu_workers=scaling.num_workers)

    @_python_spelling
    def plan(self) -> TrainingPlan:
        """The TrainingPlan (a dry run: reads model configs and the cluster, loads no weights)."""
        if self._plan is not None:
            return self._plan
        if isinstance(self._plan_arg, TrainingPlan):
            self._plan = self._plan_arg
        elif self._plan_arg != "auto":
            self._plan = TrainingPlan.load(self._plan_arg)
        else:
            self._plan = planning.make_plan(self.model, self.node_types(), self.job_spec(),
                                            calibration=self.calibration)
        return self._plan

    # -- training -------------------------------------------------------------------------------
    @_python_spelling
    def prepare_data(self):
        """Load and check the dataset (every row; DatasetError lists the bad ones), normalized."""
        from rayquant.data import prepare

        sft = self.options.sft
        return prepare(self.dataset, sft.dataset_format, sft.text_field, shuffle_seed=sft.seed,
                       split=self.dataset_split, subset=self.dataset_subset)

    @_python_spelling
    def check(self):
        """Everything that can be checked before Ray starts (rayquant.preflight): the rows, the
        plan, the model and tokenizer, every row tokenized at seq_len, the batch against the rows,
        host RAM. Returns a rayquant.preflight.CheckReport (its `warnings` name what is left out);
        raises the input's error (DatasetError, ConfigError, PlanError) with a fix. fit() runs it."""
        from rayquant.preflight import run_checks

        return run_checks(self)

    def _run_config(self) -> dict[str, Any]:
        """The run's options as plain JSON values (what trackers log as parameters)."""
        data = {"model": self.model, "dataset": self.dataset if isinstance(self.dataset, str)
                else type(self.dataset).__name__, "dataset_split": self.dataset_split,
                "dataset_subset": self.dataset_subset,
                "eval_dataset": self.eval_dataset if isinstance(self.eval_dataset, (str, type(None)))
                else type(self.eval_dataset).__name__,
                **{k: asdict(v) for k, v in (("lora", self.options.lora), ("sft", self.options.sft),
                                             ("scaling", self.options.scaling), ("run", self.options.run))}}
        return json.loads(json.dumps(data, default=str))

    def _run_name(self) -> str:
        if self.options.run.name:
            return self.options.run.name
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.model.rstrip("/").split("/")[-1])
        return f"rayquant-{base}-{time.strftime('%Y%m%d-%H%M%S')}"

    @_python_spelling
    @quiet.quieted  # the libraries' known noise filtered here and in the workers (rayquant.quiet)
    def fit(self) -> TrainResult:
        """Train on Ray and return the gathered adapter; data problems are raised before Ray starts.

        A run survives faults in its workers (rayquant.restarts): out of memory (that node type
        re-planned one step cheaper), a lost node (re-planned on the nodes left), a worker that
        died or raised (the same plan again); each restart resumes from the last checkpoint in
        fresh worker processes and is printed and recorded in the manifest's `run.restarts`."""
        checked = self.check()
        plan, total_steps = checked.plan, checked.total_steps
        for warning in checked.warnings:  # settings named by their option paths (sft.seq_len)
            print(f"[rayquant] warning: {render_options(warning)}", flush=True)
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
        from rayquant.identity import check_resume, run_identity

        # What this run trains, written into its run dir; an unfinished run of this name resumes
        # only under the same identity (or safe changes with run.resume_anyway).
        identity = run_identity(model=self.model, plan=plan, sft=self.options.sft, total_steps=total_steps,
                                data_format=checked.data.format, train_rows=checked.tokens.dataset,
                                eval_rows=checked.eval_tokens.dataset if checked.eval_tokens is not None else None)
        resumed_changes = check_resume(run_dir, name, identity, run.resume_anyway)

        import ray

        from rayquant.adapters import build_manifest, gather, write_adapter_dir
        from rayquant.restarts import REPLANNED, classify

        if tiny_arch(self.model):
            resolve_model(self.model)  # build tiny models once here, not in every worker
        started_ray = connect(self._ray_address())
        # Put once for every attempt: the tokenized rows do not depend on the plan.
        refs = {"dataset": ray.put(checked.tokens.dataset),
                "eval_dataset": (ray.put(checked.eval_tokens.dataset) if checked.eval_tokens is not None
                                 else None)}
        print(f"[rayquant] training {self.model}: {plan.num_workers} workers, {total_steps} steps of "
              f"{plan.global_batch_size} sequences, run {name} in {storage}", flush=True)
        restarts: list = []
        failures = replans = 0
        t0 = time.perf_counter()
        sigint = _sigint_handler()  # each attempt's fit() installs its own (_torch_trainer_class)
        try:
            while True:
                node_types = self._live_node_types()
                try:
                    result = self._attempt(plan, checked, name, storage, run_dir, refs, node_types)
                    break
                except Exception as error:  # Ray Train's report of failed workers; anything else re-raised
                    fault = classify(error, plan, self._lost_nodes(error, plan, node_types))
                    if fault is None:
                        raise
                    replanned = fault.cause in REPLANNED
                    if replanned and replans >= run.max_replans:
                        less = (", or plan for less memory (a smaller {seq_len}, or a `calibration` file)"
                                if fault.cause == "out_of_memory" else "")
                        raise RunRestartsSpentError(
                            f"{fault.message}; the run re-planned {replans} time(s), as many as "
                            f"{{run.max_replans}} ({run.max_replans}) allows. To fix: raise {{run.max_replans}}"
                            f"{less}; rerun with the same {{run.name}} to resume from the last checkpoint "
                            f"(in {run_dir})") from error
                    if not replanned and failures >= run.max_failures:
                        raise
                    plan = self._restart(fault, plan, run_dir, restarts)
                    replans += replanned
                    failures += not replanned
        except (KeyboardInterrupt, SystemExit):
            # Ctrl-C: the run was aborted (workers and controller); say where it stopped, shut
            # down the Ray this call started, and raise RunInterrupted.
            _set_sigint(sigint)
            raise _interrupted(name, run_dir, bool(run.name), started_ray) from None
        finally:
            _set_sigint(sigint)
        wall_s = time.perf_counter() - t0
        if result.checkpoint is None:
            raise RuntimeError(f"the run {name} ended without the final adapters; see {run_dir}")
        with result.checkpoint.as_directory() as merged:
            gathered = gather(merged, plan.num_workers)
            check_trained(gathered, run_dir)  # a run that trained nothing publishes no adapter
            manifest = build_manifest(plan.to_dict(), gathered, {
                "run": {"name": name, "storage_path": str(run_dir), "steps": total_steps,
                        "fit_wall_s": wall_s, "dataset_rows": checked.data.num_rows,
                        "dataset_format": checked.data.format,
                        "ray_address": self._ray_address() or "local",
                        "report_to": list(checked.report_to),
                        "restarts": [r.to_manifest() for r in restarts],
                        "resumed_with_changes": resumed_changes},
                "sft": asdict(self.options.sft), "data": checked.data_summary()})
            adapter_dir = write_adapter_dir(gathered.adapter_dir, manifest, dest, overwrite=run.overwrite)
        write_atomically(run_dir / FINISHED_MARKER,
                         json.dumps({"adapter_dir": str(adapter_dir), "steps": total_steps}, indent=2))
        metrics = dict(result.metrics or {}, fit_wall_s=wall_s)
        print(f"[rayquant] adapter written to {adapter_dir}", flush=True)
        return TrainResult(adapter_dir=adapter_dir, manifest=manifest, metrics=metrics, plan=plan,
                           run_dir=run_dir)

    def _attempt(self, plan: TrainingPlan, checked, name: str, storage: Path, run_dir: Path,
                 refs: dict, node_types):
        """One Ray Train run of `plan` (resuming from the run's last checkpoint, if any); returns
        Ray Train's Result, raises its TrainingFailedError."""
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

        from rayquant.contract import SftSettings, WorkerConfig
        from rayquant.progress import ProgressPrinter
        from rayquant.restarts import PROGRESS_FILE

        run = self.options.run
        check_plan_runs(plan, self.options.scaling.cpus_per_worker)
        scaling_kwargs = self._scaling_kwargs(plan, node_types)
        # The workers' environment, set by Ray when it starts their processes (worker_runtime_env).
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(quiet.worker_env())
        env["RAYQUANT_BACKEND"] = plan.node_plans[0].backend
        # Ray Train routes workers' print() to a logger, which leaks the disassembly dill prints
        # into a captured stdout while `datasets` fingerprints TRL's map functions.
        env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
        from rayquant.tracking import tracking_env

        env.update(tracking_env(checked.report_to, run_dir))
        data = checked.data
        worker_config = WorkerConfig(
            plan=plan, model=self.model,
            sft=SftSettings.from_options(self.options.sft, max_steps=checked.total_steps,
                                         seq_len=plan.job.seq_len, dataset_format=data.format,
                                         checkpoint_every_steps=run.checkpoint_every_steps,
                                         evaluate=checked.eval_tokens is not None,
                                         report_to=checked.report_to, run_name=name),
            label_selectors=scaling_kwargs.get("label_selector"), run_config=self._run_config())
        # The WorkerConfig travels as its JSON, the form tests/test_contract.py round-trips; the
        # tokenized rows beside it as Ray object references, which have no JSON form and are put
        # once for all workers rather than copied into each one's config.
        config = {"worker_config": worker_config.to_json(), **refs, "callbacks": list(self.callbacks)}
        _pickle_user_code_by_value(self.callbacks)
        trainer = _torch_trainer_class()(
            _train_loop, train_loop_config=config, scaling_config=ScalingConfig(**scaling_kwargs),
            run_config=RunConfig(
                name=name, storage_path=str(storage),
                checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
                # Restarts are the driver's (fit's loop), which re-plans where Ray Train would
                # retry the same plan: an out-of-memory error would only recur.
                failure_config=FailureConfig(max_failures=0),
                callbacks=[ProgressPrinter(run_dir / PROGRESS_FILE)],
                logging_config=LoggingConfig(log_level="WARNING"),
                worker_runtime_env=actor_runtime_env(env, "rayquant.worker.import_unsloth_first")))
        return trainer.fit()

    def _live_node_types(self):
        """The live cluster's node types when the run is on one (an address, no scaling.gpus
        description), to pin workers and to see nodes leave; None on the local machine."""
        if self._ray_address() is None or self.options.scaling.gpus:
            return None
        from rayquant.inventory import discover_node_types

        return discover_node_types(self._ray_address())

    def _lost_nodes(self, error: BaseException, plan: TrainingPlan, node_types) -> dict[str, int]:
        """Node type -> nodes of `plan`'s that left the cluster, on a live cluster after workers
        failed; when a worker's process died, waits up to NODE_DEATH_WAIT_S for Ray to mark a dead
        node (its health checks) before saying none did."""
        from rayquant.restarts import process_died, worker_exceptions

        failures = worker_exceptions(error)
        if node_types is None or not failures:
            return {}
        import ray

        used = {nt.key: set(nt.node_ids) for nt in node_types if nt.key in {p.node_type for p in plan.node_plans}}
        died = any(process_died(e) for e in failures.values())
        deadline = time.monotonic() + (NODE_DEATH_WAIT_S if died else 0.0)
        while True:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            lost = {t: len(ids - alive) for t, ids in used.items() if ids - alive}
            if lost or time.monotonic() > deadline:
                return lost
            time.sleep(1.0)

    def _restart(self, fault, plan: TrainingPlan, run_dir: Path, restarts: list) -> TrainingPlan:
        """The plan to restart with after `fault`, its restart recorded and printed."""
        from planner.replan import changed_settings, describe_changes, replan_out_of_memory
        from rayquant.restarts import Restart, last_checkpoint_step, reached_step, restart_line

        at_step = reached_step(run_dir)
        seen = calibration_file = None
        new = plan
        if fault.cause == "out_of_memory":
            report = fault.out_of_memory
            at_step = report.step if report.step is not None else at_step
            seen = report.seen_bytes
            spec = _model_spec_or_none(self.model)
            calibration_file = _write_oom_calibration(plan, report, spec, run_dir)
            try:
                new = replan_out_of_memory(plan, fault.node_type, model=spec, step=at_step, seen_bytes=seen,
                                           capacity_bytes=report.capacity_bytes).plan
            except NothingCheaperError as e:
                where = f" The memory seen is in {calibration_file} (pass it as `calibration`)." if calibration_file else ""
                raise RunOutOfMemoryError(e.template + where) from None
        elif fault.cause == "node_lost":
            from planner.plan import PlanError

            try:
                new = planning.make_plan(self.model, self._live_node_types(), plan.job,
                                         calibration=self.calibration)
            except PlanError as e:
                raise RunFaultError(f"{fault.message}, and the nodes left cannot run the job: {e.template}. "
                                    f"Checkpoints are in {run_dir}") from None
        before, after = changed_settings(plan, new, fault.node_type) if fault.node_type else ({}, {})
        restart = Restart(at_step=at_step, cause=fault.cause, node_type=fault.node_type, before=before,
                          after=after, resumed_from_step=last_checkpoint_step(run_dir), rank=fault.rank,
                          memory_seen_bytes=seen, calibration_file=calibration_file)
        restarts.append(restart)
        print(restart_line(len(restarts), restart, describe_changes(before, after), fault), flush=True)
        if calibration_file:
            print(f"[rayquant] the memory seen is written to {calibration_file}: pass it as `calibration` "
                  "so the next plan does not repeat this", flush=True)
        return new

    def _scaling_kwargs(self, plan: TrainingPlan, node_types=None) -> dict[str, Any]:
        from rayquant.placement import resources_per_worker, scaling_config_kwargs

        cpus = self.options.scaling.cpus_per_worker
        if self._ray_address() is None and all(p.gpu == CPU_DEVICE for p in plan.node_plans):
            # The local machine is the whole cluster: no labels to pin by.
            return {"num_workers": plan.num_workers, "use_gpu": False,
                    "resources_per_worker": resources_per_worker(plan, cpus)}
        from rayquant.inventory import discover_node_types

        return scaling_config_kwargs(plan, node_types or discover_node_types(self._ray_address()),
                                     cpus_per_worker=cpus)


def callback_problems(callbacks) -> list[str]:
    """What is wrong with `callbacks=`: each must be a transformers TrainerCallback (an instance or
    the class) that pickles, since it travels to every worker."""
    if not callbacks:
        return []
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence):
        return [f"callbacks: expected a list of transformers TrainerCallbacks, got {type(callbacks).__name__}"]
    from transformers import TrainerCallback

    problems = []
    for i, cb in enumerate(callbacks):
        is_callback = isinstance(cb, TrainerCallback) or (isinstance(cb, type) and issubclass(cb, TrainerCallback))
        if not is_callback:
            problems.append(f"callbacks[{i}]: expected a transformers TrainerCallback (instance or class), "
                            f"got {type(cb).__name__}")
            continue
        from ray import cloudpickle

        try:
            cloudpickle.dumps(cb)
        except Exception as e:  # what cloudpickle raises for unpicklable state varies by type
            problems.append(f"callbacks[{i}] ({type(cb).__name__}) cannot travel to the workers: it does not "
                            f"pickle ({e}); keep locks, open files and handles out of its attributes")
    return problems


def _pickle_user_code_by_value(callbacks) -> None:
    """Callbacks defined in the user's own files (a script, a test, a project that is not
    installed) travel to the workers by value: the workers may not import those files by name.
    Classes from installed packages (site-packages) travel by reference, as usual."""
    import sys
    import sysconfig

    from ray import cloudpickle

    installed = {str(Path(sysconfig.get_paths()[k]).resolve()) for k in ("purelib", "platlib")}
    for cb in callbacks:
        module = sys.modules.get((cb if isinstance(cb, type) else type(cb)).__module__)
        where = getattr(module, "__file__", None)
        if module is None or where is None or module.__name__ == "__main__":
            continue  # __main__ already travels by value
        if not any(str(Path(where).resolve()).startswith(p) for p in installed):
            cloudpickle.register_pickle_by_value(module)


class RunInterrupted(KeyboardInterrupt):
    """fit() was interrupted (Ctrl-C): the run stopped at its last checkpoint and resumes when
    started again with the same run.name. `str()` is the one line to show; `template` names
    settings as {placeholders} for a face to spell (render)."""

    def __init__(self, template: str, run_name: str, run_dir: Path, checkpoint_step: int | None) -> None:
        self.template, self.run_name, self.run_dir, self.checkpoint_step = template, run_name, run_dir, checkpoint_step
        super().__init__(self.render(python_spelling))

    def render(self, spell=None) -> str:
        return render_options(self.template, spell)


def _torch_trainer_class():
    """Ray Train's TorchTrainer with rayquant's Ctrl-C: the same graceful abort as Ray Train's own
    SIGINT handler (the controller aborts the worker group and exits), but quiet and ending in
    KeyboardInterrupt instead of sys.exit(0). Quiet: the driver stops printing the workers' logs
    first, since aborted actors race to print their teardown (a placement-group cleaner thread cut
    off mid-query prints a traceback); the session's log files keep it all."""
    import signal

    import ray
    from ray.train.torch import TorchTrainer

    class RayQuantTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:  # ray.train.v2 DataParallelTrainer's hook
            def abort(signum, frame):
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # one abort; fit()'s caller restores it
                _stop_printing_worker_logs()
                try:
                    ray.get(controller.abort.remote())
                except ray.exceptions.RayActorError:
                    pass  # the controller exits as it aborts
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, abort)

    return RayQuantTorchTrainer


def _stop_printing_worker_logs() -> None:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    except (ImportError, AttributeError):
        pass


def _interrupted(name: str, run_dir: Path, named: bool, started_ray: bool) -> RunInterrupted:
    import signal

    import ray

    from rayquant.identity import last_checkpoint_step

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # one more Ctrl-C must not cut the shutdown short
    try:
        if started_ray and ray.is_initialized():
            _stop_printing_worker_logs()  # what the aborted actors print as the cluster goes
            ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)
    step = last_checkpoint_step(run_dir)
    where = (f"its last checkpoint is step {step}" if step is not None
             else "no checkpoint was written yet (it restarts from step 0)")
    again = ("run the same command again (same {run.name})" if named
             else f"run it again with {{run.name}} set to {name}")
    return RunInterrupted(f"interrupted: run {name} stopped; {where}, in {run_dir}. To resume it, {again}.",
                          name, run_dir, step)


def _sigint_handler():
    import signal
    import threading

    return signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None


def _set_sigint(handler) -> None:
    import signal

    if handler is not None:
        signal.signal(signal.SIGINT, handler)


def check_trained(gathered, run_dir: Path | str = "") -> None:
    """Raise TrainedNothingError when the gathered ranks trained nothing: a rank took no optimizer
    step, or training stopped on (or logged) a non-finite loss."""
    problems = []
    for s in gathered.worker_stats:
        if s.global_steps == 0:
            problems.append(f"rank {s.rank} took no optimizer step (its shard: {s.shard_rows} rows)")
        if s.stopped:
            problems.append(f"rank {s.rank}: {s.stopped}")
    bad = [(step, loss) for step, loss in gathered.worker_stats[0].losses if not math.isfinite(loss)]
    if bad and not any(s.stopped for s in gathered.worker_stats):
        problems.append(f"the training loss was not finite at step(s) {', '.join(str(s) for s, _ in bad[:5])}")
    if problems:
        raise TrainedNothingError("the run trained nothing usable, so no adapter was published: "
                                  + "; ".join(dict.fromkeys(problems))
                                  + f". Its checkpoints and logs are in {run_dir}")


def check_plan_runs(plan: TrainingPlan, cpus_per_worker: int = 1) -> None:
    """Refuse, before Ray starts, a plan that Ray Train or DeepSpeed cannot run as one job: ZeRO-3
    node plans that cannot form one ZeRO group, or node types whose workers need different GPU
    counts (Ray Train reserves one bundle shape for all workers). Raises PlanError with a fix."""
    from rayquant.placement import resources_per_worker
    from rayquant.zero import check_zero3_plan

    check_zero3_plan(plan)
    resources_per_worker(plan, cpus_per_worker)


FINISHED_MARKER = "rayquant_finished.json"  # in the run dir: its final checkpoint holds adapters only


def _model_spec_or_none(model: str):
    try:
        return planning.model_spec(model)
    except Exception:  # the re-plan goes on without new predictions
        return None


def _write_oom_calibration(plan: TrainingPlan, report, spec, run_dir: Path) -> str | None:
    """On a GPU: the memory a worker held when it ran out, as a calibration file in the run
    directory (merged with the one there), which `calibration` reads so the next plan does not
    repeat the mistake. Returns its path; None on CPU or where the figures make no calibration."""
    if not report.device.startswith("cuda") or spec is None:
        return None
    from planner.calibration import Calibration, CalibrationError
    from planner.replan import out_of_memory_measurement

    path = run_dir / "calibration.json"
    try:
        m = out_of_memory_measurement(plan, report.node_type, spec, seen_bytes=report.seen_bytes,
                                      reserved_bytes=report.reserved_bytes or report.seen_bytes)
        cal = Calibration(measurements=(m,), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          environment={"source": "out-of-memory error in a rayquant run"})
        if path.exists():
            cal = Calibration.load(path).merged(cal)
        cal.save(path)
    except (CalibrationError, OSError) as e:
        print(f"[rayquant] warning: the memory seen was not written as calibration ({e})", flush=True)
        return None
    return str(path)


def _train_loop(config: dict) -> None:
    # Imported in the worker: the driver needs neither unsloth nor a GPU.
    from rayquant.contract import WorkerConfig
    from rayquant.worker import train_loop_per_worker
    from rayquant.worker import oom

    worker_config = WorkerConfig.from_json(config["worker_config"])
    try:
        train_loop_per_worker(worker_config, config["dataset"], model_path=resolve_model(worker_config.model),
                              eval_ref=config.get("eval_dataset"), callbacks=config.get("callbacks", ()))
    except Exception as e:
        if not oom.is_out_of_memory(e):
            raise
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        raise oom.report(e, rank, worker_config.plan.for_rank(rank)[0].node_type) from e
