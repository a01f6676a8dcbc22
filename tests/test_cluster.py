"""rayquant.cluster: the one way rayquant joins Ray, and what it says when joining fails."""

from __future__ import annotations

import pytest

from rayquant import cluster
from rayquant.cluster import ClusterConnectError, connect, connected, ray_address


def test_the_address_is_the_given_one_then_ray_address_then_a_new_local_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) is None and ray_address("head:6379") == "head:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_address(None) == "ray://head:10001" and ray_address("auto") == "auto"


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init replaced: records its arguments, or raises what the test sets."""
    import ray

    calls, state = [], {"raise": None, "up": False}

    def init(**kwargs):
        calls.append(kwargs)
        if state["raise"] is not None:
            raise state["raise"]
        state["up"] = True

    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: init(address=address, **kw))
    monkeypatch.setattr(ray, "shutdown", lambda: state.update(up=False))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls, state


def test_connect_starts_a_local_cluster_or_joins_the_address_once(fake_ray):
    calls, state = fake_ray
    assert connect() is True and calls[-1]["address"] == "local"
    # Ray Train's report polling interval travels with the job (not 2 s per report).
    assert calls[-1]["runtime_env"]["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == cluster.REPORT_POLL_INTERVAL_S
    assert connect("head:6379") is False and len(calls) == 1  # connected already: nothing to do
    state["up"] = False
    assert connect("head:6379", driver_logs=False) is True
    assert calls[-1]["address"] == "head:6379" and calls[-1]["log_to_driver"] is False


def test_connected_closes_only_a_connection_it_opened(fake_ray):
    _, state = fake_ray
    with connected():
        assert state["up"]
    assert not state["up"]
    state["up"] = True
    with connected():
        pass
    assert state["up"]  # the caller's connection stays


@pytest.mark.parametrize("error, needles", [
    (ConnectionError("GCS at head:6379 unreachable"),
     ["could not connect to the Ray cluster at head:6379", "To fix: check the address",
      "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "~/.ray/auth_token"]),
    (ValueError("Invalid address format: head"), ["'head:6379' is not a Ray address", "To fix: pass host:port"]),
    (RuntimeError("token authentication is enabled on the cluster"),
     ["needs a token", "RAY_AUTH_MODE=token"]),
], ids=["refused", "bad-address", "token"])
def test_joining_fails_with_the_token_auth_fix(fake_ray, error, needles):
    _, state = fake_ray
    state["raise"] = error
    with pytest.raises(ClusterConnectError) as e:
        connect("head:6379")
    for needle in needles:
        assert needle in str(e.value)


def test_an_authentication_error_says_how_to_pass_the_token(fake_ray):
    import ray.exceptions

    _, state = fake_ray
    state["raise"] = ray.exceptions.AuthenticationError("invalid token")
    with pytest.raises(ClusterConnectError, match="token authentication failed .invalid token.") as e:
        connect("head:6379")
    assert "RAY_AUTH_MODE=token" in str(e.value)


def test_other_errors_of_ray_init_are_not_dressed_as_a_bad_address(fake_ray):
    _, state = fake_ray
    state["raise"] = ValueError("runtime_env is invalid")
    with pytest.raises(ValueError, match="runtime_env"):
        connect()


def test_the_cli_reports_a_refused_cluster_as_bad_input(fake_ray, monkeypatch):
    from click.testing import CliRunner

    from rayquant.cli import main

    _, state = fake_ray
    state["raise"] = ConnectionError("unreachable")
    result = CliRunner().invoke(main, ["inventory", "--address", "head:6379"])
    assert result.exit_code == 2 and "RAY_AUTH_MODE=token" in result.output
    assert "Traceback" not in result.output
