"""Unit tests of mesh.settings: sources, precedence and validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from mesh.settings import ConfigError, PoolManagerSettings, PoolSettings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LLORCH_* variable from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("LLORCH_"):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llorch.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid() -> None:
    s = load_settings()
    assert s.listen == "127.0.0.1:50051"
    assert s.log_level == "INFO"
    assert s.orchestrator_service.queue_capacity == 1024
    assert s.pool_manager.node_id == "local"
    assert s.pool_manager.pools == []
    assert s.catalog_service.db_path is None


def test_env_var_sets_a_nested_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLORCH_ORCHESTRATOR_SERVICE__QUEUE_CAPACITY", "12")
    assert load_settings().orchestrator_service.queue_capacity == 12


def test_invalid_env_var_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLORCH_ORCHESTRATOR_SERVICE__QUEUE_CAPACITY", "0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "orchestrator_service.queue_capacity" in str(info.value)


def test_every_bad_field_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLORCH_ORCHESTRATOR_SERVICE__QUEUE_CAPACITY", "0")
    monkeypatch.setenv("LLORCH_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "orchestrator_service.queue_capacity" in message
    assert "log_level" in message


def test_toml_file_is_read(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        '[orchestrator_service]\nqueue_capacity = 7\n\n[pool_manager]\nnode_id = "gpu-box"\n',
    )
    s = load_settings(config)
    assert s.orchestrator_service.queue_capacity == 7
    assert s.pool_manager.node_id == "gpu-box"
    # Fields the file leaves out keep their defaults.
    assert s.orchestrator_service.max_prompt_bytes == 65_536


def test_toml_file_is_only_used_by_the_call_that_names_it(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "[orchestrator_service]\nqueue_capacity = 7\n")
    assert load_settings(config).orchestrator_service.queue_capacity == 7
    assert load_settings().orchestrator_service.queue_capacity == 1024


def test_invalid_toml_value_names_the_field(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "[orchestrator_service]\nqueue_capacity = -3\n")
    with pytest.raises(ConfigError, match=r"orchestrator_service\.queue_capacity"):
        load_settings(config)


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'listne = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="listne"):
        load_settings(config)


def test_env_beats_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path, "[orchestrator_service]\nqueue_capacity = 7\n")
    monkeypatch.setenv("LLORCH_ORCHESTRATOR_SERVICE__QUEUE_CAPACITY", "9")
    assert load_settings(config).orchestrator_service.queue_capacity == 9


def test_explicit_override_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLORCH_LISTEN", "127.0.0.1:1111")
    monkeypatch.setenv("LLORCH_LOG_LEVEL", "ERROR")
    s = load_settings(listen="127.0.0.1:2222")
    assert s.listen == "127.0.0.1:2222"
    assert s.log_level == "ERROR"  # not overridden: the env value stands


def test_explicit_nested_override_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLORCH_ORCHESTRATOR_SERVICE__QUEUE_CAPACITY", "9")
    s = load_settings(orchestrator_service={"queue_capacity": 5})
    assert s.orchestrator_service.queue_capacity == 5


def test_none_override_means_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLORCH_LISTEN", "127.0.0.1:1111")
    assert load_settings(listen=None).listen == "127.0.0.1:1111"


def test_invalid_override_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="log_level"):
        load_settings(log_level="CHATTY")


def test_missing_config_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_config_path_that_is_a_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(tmp_path)


def test_pool_devices() -> None:
    assert PoolSettings(pool_id="p0", model_id="m").devices == ["cpu"]
    assert PoolSettings(pool_id="p0", model_id="m", devices=["0", "1"]).devices == ["0", "1"]
    for bad in (["cpu", "0"], ["0", "cpu"], ["gpu0"], ["0", "0"], [], ["-1"]):
        with pytest.raises(ValidationError):
            PoolSettings(pool_id="p0", model_id="m", devices=bad)


def test_pool_ids_must_be_names() -> None:
    with pytest.raises(ValidationError):
        PoolSettings(pool_id="../etc", model_id="m")
    with pytest.raises(ValidationError):
        PoolSettings(pool_id="p0", model_id="Big Model")


def test_pool_with_bad_devices_in_toml_raises_config_error(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        '[[pool_manager.pools]]\npool_id = "gpu-0"\nmodel_id = "m"\ndevices = ["cpu", "0"]\n',
    )
    with pytest.raises(ConfigError, match=r"pool_manager\.pools\.0\.devices"):
        load_settings(config)


def test_pool_in_toml_is_read(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        '[[pool_manager.pools]]\npool_id = "gpu-0"\nmodel_id = "m"\ndevices = ["0", "1"]\n',
    )
    pools = load_settings(config).pool_manager.pools
    assert pools == [PoolSettings(pool_id="gpu-0", model_id="m", devices=["0", "1"])]


def test_pool_manager_settings_bounds() -> None:
    with pytest.raises(ValidationError):
        PoolManagerSettings(worker_start_timeout_s=0)


@pytest.mark.parametrize("field", ["pool_id", "model_id"])
def test_pool_names_with_double_dots_are_refused(field: str) -> None:
    values = {"pool_id": "p0", "model_id": "m0", field: "a..b"}
    with pytest.raises(ValidationError):
        PoolSettings(**values)


@pytest.mark.parametrize(
    ("variable", "hint"),
    [
        # The section is orchestrator_service: this one was silently ignored before.
        ("LLORCH_ORCHESTRATOR__QUEUE_CAPACITY", "LLORCH_ORCHESTRATOR_SERVICE__QUEUE_CAPACITY"),
        ("LLORCH_POOL_MANAGER__NODEID", "LLORCH_POOL_MANAGER__NODE_ID"),
        ("llorch_listn", "LLORCH_LISTEN"),
        ("LLORCH_SOMETHING_ELSE_ENTIRELY", None),
    ],
)
def test_an_environment_variable_that_names_no_setting_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, hint: str | None
) -> None:
    monkeypatch.setenv(variable, "7")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert variable in str(info.value)
    if hint is not None:
        assert f"did you mean {hint}?" in str(info.value)


def test_every_known_variable_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "LLORCH_ORCHESTRATOR_SERVICE__PREFIX_WAIT_S": "2",
        "LLORCH_POOL_MANAGER__POOLS": "[]",
        "LLORCH_TRACING__OTLP_ENDPOINT": "",
        "LLORCH_CATALOG_SERVICE__LISTEN": "127.0.0.1:0",
        "LLORCH_ORCHESTRATOR": "127.0.0.1:1",  # the client commands' address
        "LLORCH_API_KEY": "k",
        "LLORCH_GATEWAY_LISTEN": "127.0.0.1:0",
        "LLORCH_GATEWAY_SERVE_CERT": "",  # the REST edge's own flag
        "LLORCH_CONFIG": "",
    }.items():
        monkeypatch.setenv(name, value)
    assert load_settings().orchestrator_service.prefix_wait_s == 2


def test_an_unknown_key_inside_a_section_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[orchestrator_service]\nqueue_capacityy = 3\n")
    with pytest.raises(ConfigError, match="queue_capacityy"):
        load_settings(path)
    pools = '[pool_manager]\npools = [{pool_id = "p", model_id = "m", slotz = 2}]\n'
    with pytest.raises(ConfigError, match="slotz"):
        load_settings(write_toml(tmp_path, pools))
