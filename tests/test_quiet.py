"""What a user sees while training: the libraries' known noise filtered (rayquant.quiet), real
warnings kept, --verbose showing everything, and --json keeping stdout to one document."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from rayquant import quiet

REPO = Path(__file__).resolve().parent.parent

# Lines as the quickstart printed them (Ray 2.60, Unsloth 2026.10, torch, DeepSpeed on a CPU host).
NOISE_SAMPLES = [
    "🦥 Unsloth: Will patch your computer to enable 2x faster free finetuning.",
    "🦥 Unsloth Zoo will now patch everything to make training faster!",
    "Unsloth 2026.10.9: no GPU found, training on CPU (x86_64, 1 threads, bfloat16 = True). CPU training is "
    "much slower than GPU training; supported: text LoRA / full finetuning with SFTTrainer. Set "
    "UNSLOTH_DISABLE_CPU_FALLBACK=1 to raise instead.",
    "Unsloth (CPU): LlamaForCausalLM on 1 CPU threads. dtype = torch.bfloat16, 4-bit = True, chunked CE = True.",
    "==((====))==  Unsloth 2026.10.9: Fast Llama patching. Transformers: 4.57.1.",
    "   \\\\   /|    Num GPUs = 1. Max memory: 79.1 GB. Platform: Linux.",
    "O^O/ \\_/ \\    Torch: 2.9.0+cu128. CUDA: 9.0. CUDA Toolkit: 12.8. Triton: 3.5.0",
    "\\        /    Bfloat16 = TRUE. FA [Xformers = None. FA2 = False]",
    ' "-____-"     Free license: http://github.com/unslothai/unsloth',
    "/x/site-packages/unsloth/__init__.py:1655: UserWarning: WARNING: Unsloth should be imported before "
    "[transformers] to ensure all optimizations are applied.",
    "Please restructure your imports with 'import unsloth' at the top of your file.",
    "[rank1]:W1201 10:47:51.095000 5650 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum "
    "subclass and is now natively supported by torch.compile as an opaque value type. Calling "
    "register_constant() on Enum subclasses is deprecated and will be an error in a future release.",
    "/x/site-packages/accelerate/accelerator.py:2060: FutureWarning: `broadcast_buffers` is deprecated. Use "
    "`forward_sync_buffers` instead.",
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
    "sure you already `pip install kernels` and the kernels >= 0.11.1",
    "Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this "
    "library: /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so",
    "[2026-12-01 10:47:30,006] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to "
    "CPU. If you have GPU or other accelerator, we were unable to detect it.",
    "Disabling Tensorflow because USE_TORCH is set",
    "[transformers] mtime may not be reliable on this filesystem, falling back to numerical ordering",
    "\rLoading weights:   0%|          | 0/21 [00:00<?, ?it/s]\rLoading weights: 100%|██████████| 21/21 "
    "[00:00<00:00, 1691.80it/s]",
    "Map: 100%|██████████| 96/96 [00:00<00:00, 1234.56 examples/s]",
    "2026-12-01 10:47:30,744\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled "
    "for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "[2026-12-01 10:47:46,558 E 5396 5477] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: '8c083a44c4e1f44f18a5f2ca01000000' has constructor arguments in the object store and "
    "max_restarts > 0.",
]

# Lines that must reach the user: rayquant's own, and real warnings and errors of any library.
KEPT_SAMPLES = [
    "[rayquant] step 2/30 (7%)  loss 5.5060  tokens/s 3,606  ETA 0:00:05",
    "[rayquant] checkpoint at step 10",
    "Adapter: /tmp/q1",
    "Unsloth (CPU): optim = 'adamw_8bit' needs a GPU, using 'adamw_torch'.",
    "Unsloth (CPU): bitsandbytes 4-bit failed on CPU (boom), loading 16-bit weights instead.",
    "/x/site-packages/transformers/trainer.py:12: UserWarning: the tokenizer has no pad token",
    "/x/site-packages/accelerate/accelerator.py:9: FutureWarning: `foo` is deprecated.",
    "Traceback (most recent call last):",
    "RuntimeError: CUDA out of memory",
    "[2026-12-01 10:47:46,558 E 5396 5477] core_worker.cc:2465: Actor with class name: 'RayTrainWorker' "
    "died unexpectedly",
]


@pytest.fixture
def not_verbose(monkeypatch):
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)


@pytest.mark.parametrize("line", NOISE_SAMPLES)
def test_known_noise_is_recognized(line):
    assert quiet.is_noise(line)
    assert quiet.is_noise(f"\x1b[36m{line}\x1b[0m")


@pytest.mark.parametrize("line", KEPT_SAMPLES)
def test_rayquants_lines_and_real_warnings_are_kept(line):
    assert not quiet.is_noise(line)


def test_a_dropped_warning_takes_its_continuation_lines_along():
    out = io.StringIO()
    stream = quiet.LineFilter(out)
    stream.write("/x/unsloth/__init__.py:1655: UserWarning: WARNING: Unsloth should be imported before "
                 "[transformers] to ensure all optimizations are applied.\n\n"
                 "Please restructure your imports with 'import unsloth' at the top of your file.\n"
                 "  from ._gpu_init import *\n")
    stream.write("[rayquant] step 2/")  # a partial line waits for its end
    assert out.getvalue() == ""
    stream.write("30\n  an indented line of ours\n\n")
    stream.write("/x/y.py:3: UserWarning: a real one\n  source_line()\n")
    stream.write("Loading weights:   0%|          | 0/21 [00:00<?, ?it/s]")
    stream.write("\rLoading weights: 100%|##########| 21/21 [00:00<00:00, 1691.80it/s]\n")
    stream.write("no newline at the end")
    stream.flush_all()
    assert out.getvalue() == ("[rayquant] step 2/30\n  an indented line of ours\n\n"
                              "/x/y.py:3: UserWarning: a real one\n  source_line()\nno newline at the end")


def test_console_filters_the_driver_and_json_sends_everything_to_stderr(not_verbose, capsys):
    log = logging.getLogger("torchao")
    before = list(log.filters)  # Unsloth adds its own when a test imported it earlier
    with quiet.console(json=True) as stdout:
        print("Failed to load /x/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
        print("[rayquant] training ...")
        log.warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
        log.warning("a real torchao warning")
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("`broadcast_buffers` is deprecated. Use `forward_sync_buffers`", FutureWarning)
            warnings.warn("a real FutureWarning", FutureWarning)
        print("{}", file=stdout)
    captured = capsys.readouterr()
    assert captured.out == "{}\n"
    assert "[rayquant] training ..." in captured.err and "torchao/_C" not in captured.err
    assert [str(w.message) for w in seen] == ["a real FutureWarning"]
    assert log.filters == before  # the logging filters go with the console
    # Logged records reach the handler; the noisy one does not.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        with quiet.console():
            log.warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
            log.warning("a real torchao warning")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a real torchao warning"]


def test_verbose_filters_nothing(monkeypatch, capsys):
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    with quiet.console():
        print("Disabling Tensorflow because USE_TORCH is set")
    assert "Disabling Tensorflow" in capsys.readouterr().out
    assert quiet.worker_env() == {}


def test_the_workers_get_the_progress_bar_switches(not_verbose):
    assert quiet.worker_env() == {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_the_workers_setup_hook_filters_at_the_source(tmp_path):
    """rayquant.worker.import_unsloth_first, as Ray runs it in a fresh worker process: Unsloth's
    import (and the torch, torchao and bitsandbytes imports under it) prints none of its noise,
    while the process's own lines and real warnings still show."""
    code = ("import logging, warnings; from rayquant.worker import import_unsloth_first; "
            "import_unsloth_first(); print('[rayquant] ok'); "
            "warnings.warn('a real one', UserWarning); "
            "logging.getLogger('torchao').warning('Failed to load /x/torchao/_C_x.so: gone')")
    env = {k: v for k, v in os.environ.items() if k != quiet.VERBOSE_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]), RAYQUANT_BACKEND="unsloth")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "[rayquant] ok\n"
    assert "UserWarning: a real one" in run.stderr
    assert [n for n in QUICKSTART_NOISE if n in run.stdout + run.stderr] == [], run.stderr


def test_lines_ray_forwards_are_filtered_and_json_sends_them_to_stderr(not_verbose):
    # The dispatcher Ray's driver prints its workers' and actors' lines through.
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    batches, handlers = [], list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", batches.append)]
    try:
        quiet.filter_ray_logs()
        quiet.filter_ray_logs()  # once is enough
        dispatcher.emit({"pid": 7, "is_err": False, "lines": [
            "Unsloth (CPU): LlamaForCausalLM on 1 CPU threads. dtype = torch.bfloat16, 4-bit = True, "
            "chunked CE = True.", "", "[rayquant] step 2/30"]})
        dispatcher.emit({"pid": 8, "is_err": True, "lines": ["Disabling Tensorflow because USE_TORCH is set"]})
        with quiet.console(json=True):
            dispatcher.emit({"pid": 7, "is_err": False, "lines": ["[rayquant] step 4/30"]})
    finally:
        dispatcher.handlers = handlers
    assert batches == [{"pid": 7, "is_err": False, "lines": ["[rayquant] step 2/30"]},
                       {"pid": 7, "is_err": True, "lines": ["[rayquant] step 4/30"]}]


# -- the real quickstart ----------------------------------------------------------------------------

# Literal pieces of the noise the quickstart printed before rayquant.quiet (kept apart from its
# patterns, so a pattern that misses its line fails here).
QUICKSTART_NOISE = ("Unsloth: Will patch", "Unsloth Zoo will now patch", "==((====))==",
                    "no GPU found, training on CPU", "on 1 CPU threads. dtype =", "Please restructure your imports",
                    "Unsloth should be imported before", "_pytree.py", "broadcast_buffers", "gemm_4bit_forward",
                    "torchao/_C", "Setting accelerator to CPU", "ds_accelerator", "Disabling Tensorflow",
                    "Loading weights", "Writing model shards", "it/s]", "Map:", "Token authentication is enabled",
                    "PreemptionWatcher")


def _quickstart(tmp_path: Path) -> Path:
    """examples/quickstart.yaml cut to 6 steps, its dataset beside it, runs under tmp_path."""
    import shutil

    shutil.copytree(REPO / "examples" / "data", tmp_path / "data")
    cfg = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    cfg["sft"]["max_steps"] = 6
    cfg["run"].update(storage_path=str(tmp_path / "runs"), checkpoint_every_steps=3)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rayquant(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from rayquant.cli import main; sys.argv = ['rayquant', *sys.argv[1:]]; main()"
    env = {k: v for k, v in os.environ.items() if k != quiet.VERBOSE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *sys.path])
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


@pytest.mark.ray
def test_quickstart_shows_rayquants_lines_only_and_json_is_one_document(tmp_path):
    config = _quickstart(tmp_path)
    run = _rayquant("train", str(config), "-o", str(tmp_path / "adapter"))
    assert run.returncode == 0, run.stderr
    both = run.stdout + run.stderr
    assert "[rayquant] step 6/6 (100%)" in run.stdout and "[rayquant] checkpoint at step 3" in run.stdout
    assert f"Adapter: {tmp_path / 'adapter'}" in run.stdout
    assert [n for n in QUICKSTART_NOISE if n in both] == [], both

    # --verbose shows the libraries' lines, the workers' included (so the filter made the difference
    # above), and --json still prints one document on stdout, everything else on stderr.
    run = _rayquant("--verbose", "train", str(config), "--json", "-o", str(tmp_path / "adapter2"))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["adapter_dir"] == str(tmp_path / "adapter2") and result["manifest"]["run"]["steps"] == 6
    assert "[rayquant] step 6/6 (100%)" in run.stderr and "[rayquant] adapter written to" in run.stderr
    worker_lines = [line for line in run.stderr.splitlines() if "RayTrainWorker pid=" in line]
    assert any(n in line for line in worker_lines for n in QUICKSTART_NOISE), run.stderr
    # The workers' setup hook ran before anything imported transformers (else Unsloth says so).
    assert "Unsloth should be imported before" not in run.stderr
    assert any(n in run.stderr for n in ("torchao/_C", "_pytree.py", "Token authentication is enabled"))
