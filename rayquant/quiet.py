"""What a user sees while rayquant trains: rayquant's own lines and every real warning or error, but
not the known start-up noise of the libraries underneath (Unsloth's banners, deprecation chatter,
optional kernels that are missing on CPU, progress bars from every worker).

NOISE below is the one list of what is filtered, each pattern with where it comes from. It is
applied as close to the source as each library allows:

- environment switches for the workers (WORKER_ENV: progress bars off);
- logging filters on the named loggers that emit a known line (LOGGERS), and warnings filters for
  known warnings (WARNINGS);
- a line filter on sys.stdout / sys.stderr for what is printed without a switch: in each Ray Train
  worker (install_worker, from the worker_process_setup_hook, before Unsloth is imported) and on the
  driver while a command or RayQuantTrainer.fit runs (console);
- on the driver, a filter on the lines Ray forwards from its workers and actors (filter_ray_logs),
  which also covers what those processes write outside Python (Ray's C++ core).

`rayquant --verbose` (or RAYQUANT_VERBOSE=1, which the workers inherit) turns every filter off.

`console(json=True)` also sends everything printed while it is open to stderr, Ray's forwarded
lines included, so a command's --json document is the only thing on stdout.

Standard library only: `import rayquant.quiet` stays light.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading
import warnings
from typing import Callable, Iterable, Iterator, TextIO

VERBOSE_ENV = "RAYQUANT_VERBOSE"

# (pattern, where the line comes from). Searched (re.search) in each line, with terminal colour
# codes removed and each of a progress bar's \r-separated frames tried.
NOISE: tuple[tuple[str, str], ...] = (
    # Unsloth's import banners (unsloth/kernels/__init__.py, unsloth_zoo/__init__.py,
    # unsloth_zoo/patching_utils.py).
    (r"Unsloth: Will patch your computer to enable 2x faster", "unsloth import banner"),
    (r"Unsloth Zoo will now patch everything", "unsloth_zoo/patching_utils.py banner"),
    # Unsloth's CPU fallback banners (unsloth/_cpu_init.py; unsloth_zoo/cpu/loader.py after each
    # load). Its other "Unsloth (CPU): ..." lines say what it changed and stay.
    (r"^Unsloth \S+: no GPU found, training on CPU \(", "unsloth/_cpu_init.py banner"),
    (r"^Unsloth \(CPU\): \w+ on \d+ CPU threads\. dtype = ", "unsloth_zoo/cpu/loader.py banner"),
    # Unsloth's "sloth" box before loading and training (unsloth/models/llama.py, vision.py,
    # unsloth_zoo/training_utils.py, compiler.py): five lines.
    (r"^==\(\(====\)\)==  Unsloth", "unsloth banner box, line 1"),
    (r"^ *\\\\   /\|    ", "unsloth banner box, line 2"),
    (r"^O\^O/ \\_/ \\    ", "unsloth banner box, line 3"),
    (r"^\\        /    ", "unsloth banner box, line 4"),
    (r'^ "-____-"     ', "unsloth banner box, line 5"),
    # unsloth/_gpu_init.py warns when transformers was imported first; Ray's worker start-up
    # imports it before the setup hook can import unsloth (the worker imports unsloth first anyway).
    (r"Unsloth should be imported before \[", "unsloth/_gpu_init.py UserWarning"),
    (r"^Please restructure your imports with 'import unsloth'", "unsloth/_gpu_init.py UserWarning"),
    # torch/utils/_pytree.py: torchao registers Enum constants (a logged warning), and older
    # transformers call the private _register_pytree_node (a FutureWarning).
    (r"is an Enum subclass and is now natively supported by torch\.compile", "torch.utils._pytree log"),
    (r"torch\.utils\._pytree\._register_pytree_node` is deprecated", "torch.utils._pytree FutureWarning"),
    # accelerate/accelerator.py: transformers still passes broadcast_buffers to DDP.
    (r"FutureWarning: `broadcast_buffers` is deprecated", "accelerate FutureWarning"),
    # bitsandbytes/backends/cpu/ops.py: the optional `kernels` package is not installed.
    (r"Failed to load CPU gemm_4bit_forward from kernels-community", "bitsandbytes CPU backend log"),
    # torchao/__init__.py: its CUDA-only extensions do not load on a CPU build.
    (r"Failed to load \S*torchao\S*\.so\b", "torchao log"),
    # deepspeed/accelerator/real_accelerator.py on a machine without a GPU (older DeepSpeed:
    # "Setting ds_accelerator to cpu").
    (r"Setting accelerator to CPU\. If you have GPU or other accelerator", "DeepSpeed log"),
    (r"Setting ds_accelerator to \w+", "DeepSpeed log (older)"),
    # datasets/config.py, at INFO in Ray workers (whose root logger is at INFO).
    (r"Disabling Tensorflow because USE_TORCH is set", "datasets log"),
    # transformers/trainer_utils.py, when TRL's trainer rotates checkpoints saved within a second
    # of each other (fast CPU steps); rayquant's checkpoints are Ray Train's.
    (r"mtime may not be reliable on this filesystem, falling back to numerical ordering",
     "transformers.trainer_utils log"),
    # tqdm progress bars (transformers' "Loading weights" / "Writing model shards", datasets' Map,
    # Hub downloads): forwarded line by line from every worker they are noise; rayquant prints the
    # run's progress itself.
    (r"\d+%\|[^|]*\| *[\d.]+[kMG]?/[\d.?]+[kMG]? \[", "tqdm progress bar"),
    # ray/_private/authentication/authentication_token_setup.py, on every local cluster start.
    (r"Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE=disabled",
     "Ray log on a local cluster start"),
    # Ray Train's controller starts its PreemptionWatcher actor with max_restarts, which Ray's C++
    # core warns about at error level (ray-project/ray#53727): not an error of the run.
    (r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store",
     "Ray core_worker.cc on Ray Train's start"),
)

# Loggers that emit a line of NOISE (the filter drops only records whose message matches).
LOGGERS = ("torch.utils._pytree", "torchao", "bitsandbytes.backends.cpu.ops", "DeepSpeed",
           "datasets.config", "transformers.trainer_utils",
           "ray._private.authentication.authentication_token_setup")

# (message regex, category) for warnings.filterwarnings; the same warnings are in NOISE.
WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"WARNING: Unsloth should be imported before", UserWarning),  # unsloth/_gpu_init.py
    (r"`broadcast_buffers` is deprecated", FutureWarning),  # accelerate/accelerator.py
    (r"`?torch\.utils\._pytree\._register_pytree_node` is deprecated", FutureWarning),  # torch
)

# Environment of the Ray Train workers (datasets/config.py and huggingface_hub read these at
# import; transformers' progress bars follow huggingface_hub's switch).
WORKER_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

_NOISE = [re.compile(pattern) for pattern, _ in NOISE]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WARNING_HEADER = re.compile(r"\b\w*Warning: ")


def verbose() -> bool:
    """True with `rayquant --verbose` or RAYQUANT_VERBOSE set (to anything but 0/false/no)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_noise(line: str) -> bool:
    """True when `line` (one line of output, without its newline) is known noise."""
    text = _ANSI.sub("", line)
    return any(p.search(frame) for frame in text.split("\r") if frame.strip() for p in _NOISE)


class _Lines:
    """Which lines of one stream to keep. A dropped warning's continuation (the source line Python
    prints under it, blank lines of a multi-line message) goes with it."""

    def __init__(self) -> None:
        self.skipping = False

    def keep(self, line: str) -> bool:
        if is_noise(line):
            self.skipping = self.skipping or bool(_WARNING_HEADER.search(line))
            return False
        if self.skipping and (not line.strip() or line[:1].isspace()):
            return False
        self.skipping = False
        return True


class LineFilter:
    """A text stream that passes whole lines to `stream` unless they are noise. A partial line
    waits for its newline (so a progress bar's frames are judged together), or for flush_all()."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines = _Lines()
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._partial += text
            if "\n" in self._partial:
                *lines, self._partial = self._partial.split("\n")
                kept = [line + "\n" for line in lines if self._lines.keep(line)]
                if kept:
                    self.stream.write("".join(kept))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()

    def flush_all(self) -> None:
        """Pass on a last partial line (unless it is noise)."""
        with self._lock:
            rest, self._partial = self._partial, ""
            if rest and self._lines.keep(rest):
                self.stream.write(rest)
        self.stream.flush()

    def __getattr__(self, name: str):  # encoding, isatty, fileno, buffer, ...
        return getattr(self.stream, name)


class _LogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not is_noise(record.getMessage())
        except Exception:  # a record whose arguments do not format: not ours to judge
            return True


_LOG_FILTER = _LogFilter()


def _add_log_filters() -> None:
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_LOG_FILTER)


def _remove_log_filters() -> None:
    for name in LOGGERS:
        logging.getLogger(name).removeFilter(_LOG_FILTER)


def _add_warning_filters() -> None:
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def install_worker() -> None:
    """In a Ray Train worker, before anything heavy is imported (the worker_process_setup_hook):
    filter its warnings, its loggers and its stdout/stderr for good. Nothing with --verbose."""
    if verbose():
        return
    _add_warning_filters()
    _add_log_filters()
    if not isinstance(sys.stdout, LineFilter):
        sys.stdout = LineFilter(sys.stdout)
    if not isinstance(sys.stderr, LineFilter):
        sys.stderr = LineFilter(sys.stderr)


def worker_env() -> dict[str, str]:
    """Environment for the workers: the switches in WORKER_ENV, none with --verbose (the trainer
    forwards RAYQUANT_VERBOSE itself, so the workers show everything too)."""
    return {} if verbose() else dict(WORKER_ENV)


# -- the driver -----------------------------------------------------------------------------------
_json_depth = 0  # consoles open with json=True: Ray's forwarded stdout goes to stderr meanwhile
_depth = 0


@contextlib.contextmanager
def console(*, json: bool = False) -> Iterator[TextIO]:
    """While open, the driver's known noise is filtered (unless verbose), and with json=True all
    that is printed (and all Ray forwards) goes to stderr. Nested consoles add only their json.
    Yields the stdout it found, where a --json command writes its document."""
    global _depth, _json_depth
    outer = _depth == 0
    filtering = outer and not verbose()
    saved = sys.stdout, sys.stderr
    _depth += 1
    _json_depth += json
    try:
        with contextlib.ExitStack() as stack:
            if filtering:
                stack.enter_context(warnings.catch_warnings())
                _add_warning_filters()
                _add_log_filters()
                stack.callback(_remove_log_filters)
                sys.stderr = LineFilter(sys.stderr)
                sys.stdout = sys.stderr if json else LineFilter(sys.stdout)
            elif json:
                sys.stdout = sys.stderr
            try:
                yield saved[0]
            finally:
                for stream in {id(s): s for s in (sys.stdout, sys.stderr)}.values():
                    if isinstance(stream, LineFilter):
                        stream.flush_all()
                sys.stdout, sys.stderr = saved
    finally:
        _depth -= 1
        _json_depth -= json


def quieted(method: Callable) -> Callable:
    """Run `method` inside console() (RayQuantTrainer.fit)."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with console():
            return method(*args, **kwargs)

    return run


def _filtered(handler: Callable[[dict], None]) -> Callable[[dict], None]:
    states: dict[tuple, _Lines] = {}

    def handle(data: dict) -> None:
        if _json_depth and not data.get("is_err"):
            data = dict(data, is_err=True)
        if not verbose():
            lines = states.setdefault((data.get("pid"), data.get("is_err")), _Lines())
            kept = [line for line in data.get("lines", ()) if line.strip() and lines.keep(line)]
            if not kept:
                return
            data = dict(data, lines=kept)
        handler(data)

    handle.rayquant_filtered = True
    return handle


def filter_ray_logs() -> None:
    """Filter the lines Ray forwards to this driver from workers and actors (prefixed
    `(RayTrainWorker pid=...)` on the console): known noise and blank lines are dropped unless
    verbose, and inside console(json=True) they go to stderr. Call once Ray is initialized; does
    nothing when Ray forwards nothing (log_to_driver=False) or is already filtered."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its lines are shown as they are
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, handler if getattr(handler, "rayquant_filtered", False)
                                or name != "ray_print_logs" else _filtered(handler))
                               for name, handler in dispatcher.handlers]
