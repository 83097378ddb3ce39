"""Static checks of the team stack in infra/ (docker is not needed: the files are parsed, not run)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
WORKER_DOCKERFILE = INFRA / "worker" / "Dockerfile"
K8S_TEMPLATE = INFRA / "k8s" / "base-job-template.json"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $${VAR} is an escaped literal.
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(?::?[-?+])[^}]*)?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|(?:^|_)KEY$|ACCESS_KEY", re.IGNORECASE)


# --------------------------------------------------------------------------------------- helpers


def pinned(requirement: str) -> str:
    """The version of one `name==version` dependency of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        name, sep, version = dep.partition("==")
        if name.strip().lower() == requirement and sep:
            return version.strip()
    raise AssertionError(f"pyproject.toml pins no {requirement}==")


def as_list(command) -> list[str]:
    """A compose command (list, or string split on whitespace) as a flat list of strings."""
    if isinstance(command, str):
        return command.split()
    return [str(part) for part in command]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def container_paths(service: dict) -> set[str]:
    paths = set()
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            paths.add(volume["target"])
        else:
            paths.add(volume.split(":")[1])
    return paths


def published_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports") or []:
        text = str(port["target"] if isinstance(port, dict) else port)
        ports.add(int(text.split("/")[0].rsplit(":", 1)[-1]))
    return ports


def env_example_vars() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example line is not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# --------------------------------------------------------------------------------------- services


def test_all_services_present(services):
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"} <= set(services)


def test_named_volumes_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_postgres(services):
    pg = services["postgres"]
    assert pg["image"] == "postgres:16"
    assert "/var/lib/postgresql/data" in container_paths(pg)
    init = [v for v in pg["volumes"] if "docker-entrypoint-initdb.d" in str(v)]
    assert init, "no init script mounted into /docker-entrypoint-initdb.d"
    script = INFRA / init[0].split(":")[0]
    sql = script.read_text()
    for database in ("mlflow", "prefect"):
        assert re.search(rf"CREATE\s+DATABASE\s+{database}\b", sql, re.IGNORECASE), f"{script} creates no {database}"
    assert "pg_isready" in " ".join(as_list(pg["healthcheck"]["test"]))
    env = env_of(pg)
    assert VAR_REF.fullmatch(env["POSTGRES_PASSWORD"]), "POSTGRES_PASSWORD must come from .env"


def test_minio_and_buckets(services):
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio:")
    command = as_list(minio["command"])
    assert command[:2] == ["server", "/data"]
    assert option(command, "--console-address").endswith(":9001")
    assert {9000, 9001} <= published_ports(minio)
    assert "/data" in container_paths(minio)
    assert "healthcheck" in minio

    init = services["minio-init"]
    assert init["image"].startswith("minio/mc:")
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(as_list(init["command"]))
    for bucket in ("mlflow", "dvc"):
        assert re.search(rf"mc mb\b[^&;]*\b\w+/{bucket}\b", script), f"minio-init creates no bucket {bucket}"


def test_mlflow_server_command(services):
    mlflow = services["mlflow"]
    command = as_list(mlflow["command"])
    assert command[:2] == ["mlflow", "server"]
    assert option(command, "--host") == "0.0.0.0"
    assert option(command, "--port") == "5000"
    assert option(command, "--app-name") == "basic-auth", "MLflow must run with authentication"
    backend = option(command, "--backend-store-uri")
    # The driver the image installs, named: SQLAlchemy 2.1 reads a plain postgresql:// as psycopg 3.
    assert re.fullmatch(r"postgresql\+psycopg2://\$\{\w+\}:\$\{\w+\}@postgres:5432/mlflow", backend), backend
    assert option(command, "--artifacts-destination") == "s3://mlflow/"
    assert "--serve-artifacts" in command
    assert 5000 in published_ports(mlflow)
    assert container_paths(mlflow), "the MLflow auth user store needs a volume"


def test_mlflow_env(services):
    env = env_of(services["mlflow"])
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                 "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert VAR_REF.fullmatch(env.get(name, "")), f"mlflow {name} must be a ${{VAR}} from .env"


def test_mlflow_image_pins_project_mlflow():
    version = pinned("mlflow")
    text = MLFLOW_DOCKERFILE.read_text()
    pins = re.findall(r"mlflow==([0-9][^\s\"']*)", text)
    assert pins == [version], f"{MLFLOW_DOCKERFILE} pins mlflow {pins}, pyproject.toml {version}"
    for package in ("psycopg2-binary", "boto3"):
        assert package in text


def test_mlflow_auth_config_has_no_secret():
    mlflow_dir = INFRA / "mlflow"
    ini = mlflow_dir / "basic_auth.ini"
    text = ini.read_text()
    assert "MLFLOW_AUTH_CONFIG_PATH" in MLFLOW_DOCKERFILE.read_text()
    assert not re.search(r"^\s*admin_password\s*=", text, re.MULTILINE), "admin password belongs in .env"
    assert re.search(r"^\s*database_uri\s*=\s*sqlite:////mlflow-auth/", text, re.MULTILINE)


def test_prefect_server(services):
    server = services["prefect-server"]
    image, _, tag = server["image"].partition(":")
    assert image == "prefecthq/prefect"
    assert tag.split("-")[0] == pinned("prefect"), f"prefect image {tag} vs pyproject {pinned('prefect')}"
    assert tag.endswith("-python3.11")
    command = as_list(server["command"])
    assert command[:3] == ["prefect", "server", "start"]
    assert option(command, "--host") == "0.0.0.0"
    assert option(command, "--port") == "4200"
    assert 4200 in published_ports(server)
    url = env_of(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert re.fullmatch(r"postgresql\+asyncpg://\$\{\w+\}:\$\{\w+\}@postgres:5432/prefect", url), url


def test_prefect_worker(services):
    worker = services["prefect-worker"]
    build = worker["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == WORKER_DOCKERFILE
    dockerfile = WORKER_DOCKERFILE.read_text()
    assert re.search(r"pip install -r requirements\.lock", dockerfile)
    assert re.search(r"pip install -e \.", dockerfile)
    command = as_list(worker["command"])
    assert command[:3] == ["prefect", "worker", "start"]
    assert option(command, "--pool") == "segflow-pool"
    assert option(command, "--type") == "process"
    env = env_of(worker)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert VAR_REF.fullmatch(env.get(name, "")), f"worker {name} must be a ${{VAR}} from .env"


def test_worker_api_url_points_at_prefect_server(services):
    url = env_of(services["prefect-worker"])["PREFECT_API_URL"]
    match = re.fullmatch(r"http://([\w-]+):(\d+)/api", url)
    assert match, url
    host, port = match.group(1), match.group(2)
    assert host in services, f"PREFECT_API_URL host {host} is no compose service"
    assert services[host]["image"].startswith("prefecthq/prefect:")
    assert option(as_list(services[host]["command"]), "--port") == port


def test_worker_waits_for_its_servers(services):
    depends = services["prefect-worker"]["depends_on"]
    assert {"prefect-server", "mlflow"} <= set(depends)


# --------------------------------------------------------------------------------------- secrets


def test_every_variable_is_in_env_example(compose_text):
    # Comment lines are not interpolated by compose; everything else is.
    code = "\n".join(line for line in compose_text.splitlines() if not line.lstrip().startswith("#"))
    used = set(VAR_REF.findall(code))
    assert used, "the compose file reads no variable from .env"
    missing = used - set(env_example_vars())
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_env_example_values_are_placeholders():
    for name, value in env_example_vars().items():
        if SECRET_KEY.search(name):
            assert "change-me" in value, f".env.example {name} should be a change-me placeholder"


def _literal_secrets(node, path=""):
    """(path, value) of every mapping entry whose key looks secret and whose value is a literal."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}"
            if SECRET_KEY.search(str(key)) and not isinstance(value, (dict, list)):
                if value is not None and not VAR_REF.fullmatch(str(value)):
                    yield where, value
            yield from _literal_secrets(value, where)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            if isinstance(item, str) and "=" in item:
                key, _, value = item.partition("=")
                if SECRET_KEY.search(key) and not VAR_REF.fullmatch(value):
                    yield f"{path}[{index}]", value
            yield from _literal_secrets(item, f"{path}[{index}]")


def test_no_literal_secret_in_compose(compose, compose_text):
    found = list(_literal_secrets(compose))
    assert not found, f"literal secrets in docker-compose.yml: {found}"
    # Credentials inside URLs must be variables too (user:password@host).
    for user, password in re.findall(r"://([^:/@\s]+):([^@\s]+)@", compose_text):
        assert VAR_REF.fullmatch(user) and VAR_REF.fullmatch(password), f"literal credentials {user}:{password}"
    # Plain `password: value` / `secret: value` lines anywhere in the text.
    for line in compose_text.splitlines():
        match = re.match(r"\s*-?\s*([\w.-]*(?:password|secret)[\w.-]*)\s*[:=]\s*(\S.*)$", line, re.IGNORECASE)
        if match and not line.strip().startswith("#"):
            assert VAR_REF.search(match.group(2)), f"literal secret: {line.strip()}"


def test_dotenv_is_git_ignored():
    lines = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert any(line in (".env", "**/.env", "infra/.env", "/infra/.env") for line in lines)


def test_worker_build_keeps_secrets_and_venv_out():
    ignore = (INFRA / "worker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ".env" in ignore and ".venv/" in ignore


# --------------------------------------------------------------------------------------- kubernetes


@pytest.fixture(scope="module")
def job_template() -> dict:
    return json.loads(K8S_TEMPLATE.read_text())


def _container(job_configuration: dict) -> dict:
    return job_configuration["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def test_k8s_template_shape(job_template):
    assert set(job_template) == {"job_configuration", "variables"}
    manifest = job_template["job_configuration"]["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    # Prefect's own check: every {{ placeholder }} is a declared variable.
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(job_template)


def test_k8s_template_requests_gpu(job_template):
    container = _container(job_template["job_configuration"])
    gpu = container["resources"]["requests"]["nvidia.com/gpu"]
    match = re.fullmatch(r"\{\{\s*(\w+)\s*\}\}", str(gpu))
    assert match, "the GPU request should be a variable"
    variable = job_template["variables"]["properties"][match.group(1)]
    assert variable["type"] == "integer" and variable["default"] == 1
    image = re.fullmatch(r"\{\{\s*(\w+)\s*\}\}", container["image"])
    assert image and image.group(1) in job_template["variables"]["properties"]


def test_k8s_template_renders_with_defaults(job_template):
    from prefect.utilities.templating import apply_values

    properties = job_template["variables"]["properties"]
    defaults = {name: spec["default"] for name, spec in properties.items() if "default" in spec}
    rendered = apply_values(job_template["job_configuration"], defaults)
    container = _container(rendered)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item for item in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
    assert env["PREFECT_API_URL"]["value"].endswith("/api")
    assert "valueFrom" in env["MLFLOW_TRACKING_PASSWORD"], "credentials come from a Kubernetes secret"
    assert "value" not in env["MLFLOW_TRACKING_PASSWORD"]


def test_readme_covers_setup():
    readme = (INFRA / "README.md").read_text()
    for needle in ("cp .env.example .env", "docker compose up -d", "MLFLOW_TRACKING_URI=http://HOST:5000",
                   "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL=http://HOST:4200/api",
                   "dvc remote add -d team s3://dvc", "dvc remote modify team endpointurl http://HOST:9000",
                   "prefect work-pool create", "--base-job-template infra/k8s/base-job-template.json"):
        assert needle in readme, needle
