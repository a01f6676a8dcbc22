"""Joining Ray: the one way rayquant connects this process to a Ray cluster.

`connect(address)` is used by the trainer, the live inventory and `rayquant calibrate --ray` alike:

- `address` given: join that cluster (`host:6379`, `ray://head:10001`, or `auto` for a cluster
  started with `ray start` on this machine);
- else `RAY_ADDRESS` when set (KubeRay and `ray job submit` set it for the job's driver);
- else a new local cluster on this machine (never a `ray start` cluster that happens to run here:
  pass its address, or `auto`, to use one).

Ray 2.60 enables token authentication on the clusters it starts. A client joining one by address
needs `RAY_AUTH_MODE=token` and the cluster's token in `~/.ray/auth_token` or `RAY_AUTH_TOKEN`; when
joining fails, ClusterConnectError says so. Ray is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from planner.vocab import SettingError

ADDRESS_ENV = "RAY_ADDRESS"
LOCAL = "local"
# Ray Train's controller polls each worker's one-slot result queue every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and ray.train.report blocks until then: with a
# report per logging step, that interval would pace training (measured: 2 s/step).
REPORT_POLL_INTERVAL_S = "0.2"
_TOKEN_HELP = ("If the cluster uses token authentication (the default for clusters Ray 2.60 "
               "starts), export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN (or "
               "save it to ~/.ray/auth_token), then retry")


class ClusterConnectError(SettingError):
    """This process could not join the Ray cluster: the message says why and how to fix it."""


def ray_address(address: str | None = None) -> str | None:
    """The cluster `connect(address)` joins: `address`, else RAY_ADDRESS; None for a new local one."""
    return address or os.environ.get(ADDRESS_ENV) or None


def connect(address: str | None = None, *, driver_logs: bool = True) -> bool:
    """Connect this process to Ray (see the module docstring for which cluster), unless it is
    connected already. Returns True when this call connected, so a caller that only needed Ray for
    a moment may `ray.shutdown()`. `driver_logs=False` keeps tasks' output off this terminal.
    Raises ClusterConnectError when the cluster cannot be joined."""
    import ray

    from rayquant.quiet import filter_ray_logs

    if ray.is_initialized():
        filter_ray_logs()
        return False
    target = ray_address(address)
    where = f"the Ray cluster at {target}" if target else "a new local Ray cluster"
    interval = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval}
    local = {}
    if not target:
        # Ray Train's placement-group cleaner asks the state API whether the controller lives; with
        # no address it finds "the" local cluster, which on a machine running several is the one
        # started last: it then sees no controller, removes this run's placement group and kills
        # the run. Its processes are told this cluster's dashboard instead.
        port = _free_port()
        local = {"dashboard_port": port}
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        with _local_processes_ignore_sigint(starting=not target):
            ray.init(address=target or LOCAL, logging_level="WARNING" if driver_logs else "ERROR",
                     log_to_driver=driver_logs, runtime_env={"env_vars": env}, **local)
    except ray.exceptions.AuthenticationError as e:
        raise ClusterConnectError(
            f"{where} refused this client: token authentication failed ({e.message}).\n"
            f"To fix: {_TOKEN_HELP}.") from None
    except ConnectionError as e:
        # A refused token surfaces here too, after Ray's own retries (Ray 2.60 logs
        # "InvalidAuthToken" from its GCS client but raises only ConnectionError).
        raise ClusterConnectError(
            f"could not connect to {where}: {e}\nTo fix: check the address (`ray status` on the "
            f"head node prints it). {_TOKEN_HELP}. Or leave the address (and {ADDRESS_ENV}) out "
            f"to start a local cluster.") from None
    except ValueError as e:
        if "address" not in str(e).lower():  # only ray.init's check of the address's form
            raise
        raise ClusterConnectError(
            f"{target!r} is not a Ray address ({e}).\nTo fix: pass host:port (e.g. "
            f"head:6379), ray://head:10001, or auto for a cluster started on this machine.") from None
    except RuntimeError as e:
        if "auth" not in str(e).lower() and "token" not in str(e).lower():
            raise
        raise ClusterConnectError(f"{where} needs a token: {e}\nTo fix: {_TOKEN_HELP}.") from None
    filter_ray_logs()  # the known noise of workers and actors kept off this console (rayquant.quiet)
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _local_processes_ignore_sigint(starting: bool) -> Iterator[None]:
    """While a local cluster starts: SIGINT ignored, a disposition every process Ray starts (GCS,
    raylet, dashboard, and the workers the raylet starts) inherits, Python ones included. Ctrl-C
    in a terminal signals the whole foreground process group; this way only the driver sees it,
    and Ray Train's handler there aborts the run while the cluster is still whole (else the
    dashboard and actors die mid-abort and print their tracebacks). The driver's ray.shutdown()
    then ends them."""
    import signal
    import threading

    if not starting or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def actor_runtime_env(env_vars: dict[str, str], setup_hook: str) -> dict:
    """A runtime env for actors (Ray Train's worker_runtime_env) whose processes run `setup_hook`
    (a module path) when they start. Ray 2.60 honours worker_process_setup_hook only in ray.init's
    job-level runtime env and ignores it in an actor's, so the hook is set as the environment
    variable Ray's worker start-up reads, by the conversion ray.init applies."""
    from ray._private.runtime_env.setup_hook import export_setup_func_module

    return export_setup_func_module({"env_vars": dict(env_vars)}, setup_hook)


@contextlib.contextmanager
def connected(address: str | None = None, *, driver_logs: bool = True) -> Iterator[None]:
    """`connect(address)` for the body of a `with`; a connection this made is closed after it."""
    import ray

    started = connect(address, driver_logs=driver_logs)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
