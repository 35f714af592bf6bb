"""deploy/k8s/, checked offline: every object against the Kubernetes API schemas (bundled with
kubernetes-validate, strict: unknown fields fail), every LLORCH_* variable against the settings
it must set (so a typo or a bad value fails here, not in a pod), and the probes against the
health port the container opens."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from launch.gateway import find_gateway
from mesh.settings import ConfigError, Settings, load_settings
from mesh.tls import init_ca, issue

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSIONS = ["1.30.0", "1.34.0"]  # the oldest and a recent release we claim to run on
# What the downward API fills in at run time, as a pod would see it.
DOWNWARD = {"NODE_NAME": "gpu-node-1", "POD_IP": "10.0.3.7"}


def _is_setting(env_name: str) -> bool:
    """Whether ``LLORCH_A__B`` names the field a.b of the settings (nested sections ignore
    unknown keys, so a misspelt name would otherwise pass unnoticed)."""
    if not env_name.startswith("LLORCH_"):
        return True  # the downward API's helpers
    model: type[BaseModel] = Settings
    parts = env_name.removeprefix("LLORCH_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def _objects() -> list[dict[str, Any]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", []))


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_kubernetes(version: str) -> None:
    objects = _objects()
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == [
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "Namespace",
        "PersistentVolumeClaim",
        "Service",
        "StatefulSet",
    ]
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_every_setting_the_manifests_set_exists_and_is_valid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_maps = {o["metadata"]["name"]: o["data"] for o in _objects() if o["kind"] == "ConfigMap"}
    tls_file = tmp_path / "file.pem"
    tls_file.write_text("x")  # the settings check that TLS files exist, not what is in them
    checked = 0
    for obj in _objects():
        for container in _containers(obj):
            if container["name"] == "gateway":
                continue  # a Go binary with flags: test_the_gateway_flags_are_valid
            env: dict[str, str] = {}
            for var in container.get("env", []):
                if "value" in var:
                    value = re.sub(r"\$\((\w+)\)", lambda m: DOWNWARD[m[1]], var["value"])
                elif "configMapKeyRef" in var.get("valueFrom", {}):
                    ref = var["valueFrom"]["configMapKeyRef"]
                    value = config_maps[ref["name"]][ref["key"]]
                else:
                    continue  # the downward API itself
                if var["name"].startswith("LLORCH_TLS__"):
                    value = str(tls_file)
                env[var["name"]] = value
            for name in env:
                assert _is_setting(name), f"{obj['metadata']['name']}: {name} sets nothing"
            for name in [n for n in os.environ if n.startswith("LLORCH_")]:
                monkeypatch.delenv(name)
            for name, value in env.items():
                if name.startswith("LLORCH_"):
                    monkeypatch.setenv(name, value)
            try:
                settings = load_settings()
            except ConfigError as exc:
                raise AssertionError(f"{obj['metadata']['name']}: {exc}") from None
            assert settings.tls.files() is not None, "every service runs with TLS"
            # The probes ask the plaintext health port the container opens.
            health_port = int(env["LLORCH_HEALTH_LISTEN"].rsplit(":", 1)[1])
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in container:
                    assert container[probe]["grpc"]["port"] == health_port
            checked += 1
    assert checked == 3


def test_the_kubernetes_page_makes_every_secret_the_manifests_mount() -> None:
    page = (K8S.parents[1] / "docs" / "kubernetes.md").read_text()
    secrets = {
        volume["secret"]["secretName"]
        for obj in _objects()
        for volume in obj.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", [])
        if "secret" in volume
    }
    assert secrets == {
        "llorch-tls-catalog",
        "llorch-tls-orchestrator",
        "llorch-tls-poolmanager",
        "llorch-tls-gateway",
    }
    for secret in secrets:
        assert f"kubectl -n llorch create secret generic {secret}" in page


@pytest.mark.skipif(find_gateway() is None, reason="llorch-gateway is not built (`make gateway`)")
def test_the_gateway_flags_are_valid(tmp_path: Path) -> None:
    """The edge's arguments, with the Secret's files made real, pass its own -check."""
    init_ca(tmp_path / "ca")
    issue(tmp_path / "ca", "gateway", "edge", tmp_path, sans=("llorch.example.com",))
    files = {
        "/etc/llorch/tls/ca.pem": tmp_path / "ca" / "ca.pem",
        "/etc/llorch/tls/tls.pem": tmp_path / "edge.pem",
        "/etc/llorch/tls/tls.key": tmp_path / "edge.key",
    }
    (container,) = [c for o in _objects() for c in _containers(o) if c["name"] == "gateway"]
    real = re.compile(r"/etc/llorch/tls/[a-z.]+")
    args = [real.sub(lambda m: str(files[m[0]]), arg) for arg in container["args"]]
    done = subprocess.run(
        [str(find_gateway()), *args, "-check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "HTTPS: true" in done.stdout and "TLS: true" in done.stdout
    # The readiness probe asks the port the edge listens on, in the scheme it serves.
    listen_port = int(next(a for a in args if a.startswith("-listen=")).rsplit(":", 1)[1])
    assert container["ports"][0]["containerPort"] == listen_port
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
