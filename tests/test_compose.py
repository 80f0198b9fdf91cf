"""compose.yaml is for users with Docker: check its shape without running it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
import yaml

REPO = Path(__file__).resolve().parent.parent
PROJECT_SERVICES = {
    "sidecar",
    "topics",
    "watcher",
    "receipt-builder",
    "siem-exporter",
    "worker-demo",
}
INFRA = {"kafka", "clickhouse", "temporal", "schema-registry"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return data


@pytest.mark.unit
def test_every_service_has_image_or_build(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == PROJECT_SERVICES | INFRA
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name


@pytest.mark.unit
def test_project_services_build_from_the_one_dockerfile(compose: dict[str, Any]) -> None:
    assert (REPO / "Dockerfile").exists()
    for name in PROJECT_SERVICES:
        svc = compose["services"][name]
        assert svc["build"] == ".", name
        assert svc["command"], name


@pytest.mark.unit
def test_project_services_point_at_the_right_hosts(compose: dict[str, Any]) -> None:
    for name in PROJECT_SERVICES:
        env = compose["services"][name]["environment"]
        assert env["CHIO_KAFKA_BOOTSTRAP"] == "kafka:9092", name
        assert env["CHIO_TEMPORAL_ADDRESS"] == "temporal:7233", name
        assert "@clickhouse:8123" in env["CHIO_CLICKHOUSE_DSN"], name
        assert env["CHIO_SIDECAR_URL"] == "http://sidecar:9090", name
        assert env["CHIO_SCHEMA_REGISTRY_URL"].startswith("http://schema-registry:8080/"), name


@pytest.mark.unit
def test_published_ports_bind_loopback_and_infra_has_healthchecks(
    compose: dict[str, Any],
) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    for name in INFRA | {"sidecar"}:
        assert "healthcheck" in compose["services"][name], name


@pytest.mark.unit
def test_dependencies_name_existing_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)


COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose" / "compose-spec.json"
# Variables the CLI reads from the environment without a flag (README, Configuration).
ENVIRONMENT_ONLY = {
    "CHIO_DATA_DIR",
    "CHIO_CACHE_DIR",
    "CHIO_LOG_LEVEL",
    "CHIO_KAFKA_SASL_PASSWORD",
    "CHIO_KAFKA_SSL_KEY_PASSWORD",
    "CHIO_TEMPORAL_API_KEY",
    "CHIO_ARGUMENT_KEY",
    "CHIO_ARGUMENT_KEY_ID",
}


@pytest.mark.unit
def test_compose_file_validates_against_the_compose_specification(
    compose: dict[str, Any],
) -> None:
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path)
    )
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def _subcommands(command: Any) -> dict[str, Any]:
    # typer ships its own click: tell a group by its subcommands, not by a click class.
    subs: dict[str, Any] = getattr(command, "commands", {})
    return subs


def _cli_command(args: list[str]) -> Any:
    """The command ``args`` names in the typer app (options are not followed)."""
    from chio_receipts.cli import app

    command: Any = typer.main.get_command(app)
    for word in args:
        if word.startswith("-") or not _subcommands(command):
            break
        sub = _subcommands(command).get(word)
        assert sub is not None, f"no command {word!r} in {args}"
        command = sub
    return command


@pytest.mark.unit
def test_project_service_commands_are_real_cli_commands(compose: dict[str, Any]) -> None:
    for name in PROJECT_SERVICES:
        args = [str(a) for a in compose["services"][name]["command"]]
        command = _cli_command(args)
        assert not _subcommands(command), (name, args)
        flags = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        for word in args:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in flags, (name, word)
        # Parsing the whole command line must succeed (types, ranges, choices).
        ctx = command.make_context(name, args[len(args) - _tail_len(args) :])
        ctx.close()


def _tail_len(args: list[str]) -> int:
    """How many of ``args`` follow the command path (the options and arguments)."""
    for i, word in enumerate(args):
        if word.startswith("-"):
            return len(args) - i
    return 0


@pytest.mark.unit
def test_environment_variables_are_ones_the_cli_reads(compose: dict[str, Any]) -> None:
    from chio_receipts.cli import app

    read = set(ENVIRONMENT_ONLY)
    stack: list[Any] = [typer.main.get_command(app)]
    while stack:
        command = stack.pop()
        read |= {p.envvar for p in command.params if isinstance(p.envvar, str)}
        stack.extend(_subcommands(command).values())
    for name in PROJECT_SERVICES:
        for variable in compose["services"][name]["environment"]:
            assert variable in read, (name, variable)


@pytest.mark.unit
def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck")
        assert check, name
        assert check.get("test"), name
        assert not check.get("disable"), name


@pytest.mark.unit
def test_every_volume_is_declared_and_data_lives_on_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, svc in compose["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount.get("source")
            assert source, (name, mount)
            assert not source.startswith((".", "/", "~")), (name, mount)
            assert source in declared, (name, source)
            used.add(source)
    assert used == declared
    services = compose["services"]
    for name in PROJECT_SERVICES - {"topics"}:
        data_dir = services[name]["environment"]["CHIO_DATA_DIR"]
        assert any(m.endswith(f":{data_dir}") for m in services[name]["volumes"]), name
    sidecar_env = services["sidecar"]["environment"]
    assert sidecar_env["CHIO_SIDECAR_DATA_DIR"].startswith(sidecar_env["CHIO_DATA_DIR"] + "/")
    # The control token is read from the environment, never written here.
    assert sidecar_env["CHIO_SIDECAR_TOKEN"].startswith("${CHIO_SIDECAR_TOKEN")


@pytest.mark.unit
def test_services_listen_on_the_container_network(compose: dict[str, Any]) -> None:
    services = compose["services"]
    serve = services["sidecar"]["command"]
    assert serve[serve.index("--host") + 1] == "0.0.0.0"
    for name in PROJECT_SERVICES - {"sidecar", "topics"}:
        env = services[name]["environment"]
        assert env["CHIO_METRICS_HOST"] == "0.0.0.0", name
        assert env["CHIO_METRICS_PORT"], name


def _dockerfile_copies() -> list[tuple[str, str]]:
    """(source, destination) of every COPY in the Dockerfile, relative to WORKDIR."""
    pairs: list[tuple[str, str]] = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            *sources, dest = words[1:]
            pairs.extend((s, dest) for s in sources)
    return pairs


@pytest.mark.unit
def test_dockerfile_copies_the_package_folders_with_their_symlinks() -> None:
    copied = {src for src, _ in _dockerfile_copies()}
    package = REPO / "chio_receipts"
    assert "chio_receipts" in copied
    for link in package.iterdir():
        if link.is_symlink():
            # A relative link into a sibling folder: that folder must be copied too, to the same
            # relative place, or the link dangles in the image.
            target = (package / link.readlink()).resolve().relative_to(REPO)
            assert str(target) in copied, (link.name, target)


@pytest.mark.integration
def test_wheel_from_the_docker_context_has_every_subpackage(tmp_path: Path) -> None:
    context = tmp_path / "app"
    context.mkdir()
    for src, dest in _dockerfile_copies():
        source = REPO / src
        target = context / (src if dest.endswith("/") else dest)
        target.parent.mkdir(parents=True, exist_ok=True)  # as COPY does
        if source.is_dir():
            shutil.copytree(
                source,
                target,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        else:
            shutil.copy2(source, target)
    out = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(out),
            str(context),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    # Every package under chio_receipts/, through its symlinked folders (os.walk follows them).
    expected = {
        str(Path(root).relative_to(REPO))
        for root, _, files in os.walk(REPO / "chio_receipts", followlinks=True)
        if "__init__.py" in files
    }
    assert "chio_receipts/sidecar" in expected
    assert expected, "no subpackages found"
    assert expected <= packaged, sorted(expected - packaged)
    for data in ("chio_receipts/schemas/avro", "chio_receipts/consumers/sql"):
        assert any(n.startswith(data + "/") for n in names), data
