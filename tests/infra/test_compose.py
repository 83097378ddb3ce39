"""Static checks of the team stack in infra/ (docker is not needed: the files are parsed, not run).

Its shell scripts (secrets check, MinIO set-up) do run, under the local sh with a stand-in for `mc`.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
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
CHECK_SECRETS = INFRA / "check-secrets.sh"
MINIO_INIT = INFRA / "minio" / "init.sh"
LOCALHOST = "127.0.0.1"
# Services whose containers run long; the one-shot jobs set the stack up before them.
LONG_RUNNING = {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $${VAR} is an escaped literal.
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(?::?[-?+])[^}]*)?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|(?:^|_)KEY$|ACCESS_KEY", re.IGNORECASE)
# A published port, short syntax: [HOST_IP:][PUBLISHED:]TARGET[/PROTOCOL]; HOST_IP may be a ${VAR:-default}.
PORT = re.compile(r"(?:(?P<ip>\$\{[^}]*\}|\d+(?:\.\d+){3}|\[[0-9a-f:]*\]):)?(?:(?P<published>[\d-]+):)?"
                  r"(?P<target>[\d-]+)(?:/\w+)?")


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


def interpolated(value: str, env: dict[str, str]) -> str:
    """``value`` with each ${VAR}, ${VAR:-default}, ${VAR-default} replaced as docker compose does with ``env``."""

    def one(match: re.Match) -> str:
        name, operator, default = match.group(1), match.group(2) or "", match.group(3) or ""
        if operator == ":-" and not env.get(name) or operator == "-" and name not in env:
            return default
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", one, value)


def host_ips(service: dict, env: dict[str, str]) -> list[str]:
    """The host address each published port binds to, with .env holding ``env`` ("" for all interfaces)."""
    addresses = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            addresses.append(interpolated(str(port.get("host_ip", "")), env))
        else:
            match = PORT.fullmatch(str(port))
            assert match, f"unreadable port {port!r}"
            addresses.append(interpolated(match.group("ip") or "", env))
    return addresses


def compose_vars(text: str) -> set[str]:
    """Names of the .env variables the text interpolates (comment lines are not interpolated)."""
    return set(VAR_REF.findall("\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))))


def last_user(dockerfile: Path) -> str:
    users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
    assert users, f"{dockerfile} has no USER line: its containers would run as root"
    return users[-1]


def service_user(name: str, service: dict) -> str:
    """The user a service's container runs as: its user:, else the last USER of the Dockerfile it builds."""
    if "user" in service:
        return str(service["user"])
    assert "build" in service, f"{name} runs as its image's default user, root for most: set user:"
    return last_user(COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"])


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
    assert LONG_RUNNING | {"minio-init", "secrets-check", "volume-owners"} <= set(services)


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
    assert any(v.startswith("./minio:") and v.endswith(":ro") for v in init["volumes"]), "init.sh is not mounted"
    assert as_list(init["command"]) == ["/segflow-minio/init.sh"]


def test_mlflow_server_command(services):
    mlflow = services["mlflow"]
    command = as_list(mlflow["command"])
    assert command[:2] == ["mlflow", "server"]
    assert option(command, "--host") == "0.0.0.0"  # in the container; the host binds it to 127.0.0.1
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
    pins = re.findall(r"mlflow(\[[\w,]+\])?==([0-9][^\s\"']*)", text)
    # [auth] brings Flask-WTF, without which `mlflow server --app-name basic-auth` does not start.
    assert pins == [("[auth]", version)], f"{MLFLOW_DOCKERFILE} pins mlflow {pins}, pyproject.toml {version}"
    for package in ("psycopg2-binary", "boto3"):
        assert package in text


def test_mlflow_auth_config_has_no_secret():
    mlflow_dir = INFRA / "mlflow"
    ini = mlflow_dir / "basic_auth.ini"
    text = ini.read_text()
    assert "MLFLOW_AUTH_CONFIG_PATH" in MLFLOW_DOCKERFILE.read_text()
    assert not re.search(r"^\s*admin_password\s*=", text, re.MULTILINE), "admin password belongs in .env"
    assert re.search(r"^\s*database_uri\s*=\s*sqlite:////mlflow-auth/", text, re.MULTILINE)


def test_mlflow_users_see_only_what_they_are_granted():
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"


def test_prefect_server(services):
    server = services["prefect-server"]
    image, _, tag = server["image"].partition(":")
    assert image == "prefecthq/prefect"
    assert tag.split("-")[0] == pinned("prefect"), f"prefect image {tag} vs pyproject {pinned('prefect')}"
    assert tag.endswith("-python3.11")
    command = as_list(server["command"])
    assert command[:3] == ["prefect", "server", "start"]
    assert option(command, "--host") == "0.0.0.0"  # in the container; the host binds it to 127.0.0.1
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
    used = compose_vars(compose_text)
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


# --------------------------------------------------------------------------------------- closed by default


def test_ports_are_published_on_localhost_unless_the_operator_opts_in(services):
    published = {name: service for name, service in services.items() if service.get("ports")}
    assert {"minio", "mlflow", "prefect-server"} <= set(published)
    for name, service in published.items():
        assert set(host_ips(service, {})) == {LOCALHOST}, f"{name} publishes a port beyond this machine"
        # One switch opens them all, for an operator who means it (README: a TLS reverse proxy instead).
        assert set(host_ips(service, {"SEGFLOW_BIND": "0.0.0.0"})) == {"0.0.0.0"}, name
    assert env_example_vars()["SEGFLOW_BIND"] == LOCALHOST


def test_prefect_api_requires_the_auth_string(services, monkeypatch):
    from prefect.settings import Settings

    server, worker = env_of(services["prefect-server"]), env_of(services["prefect-worker"])
    required = "${PREFECT_API_AUTH_STRING:?set PREFECT_API_AUTH_STRING in infra/.env}"
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == required, "the server must refuse to start without it"
    assert worker["PREFECT_API_AUTH_STRING"] == required, "the worker must send what the server requires"
    # Prefect's own settings read these names (a misspelt one would leave the API open), and the
    # unprivileged server's writable places.
    for name, value in {**server, **worker}.items():
        if name.startswith("PREFECT_") and not VAR_REF.search(value):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "team:server-secret")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "team:client-secret")
    settings = Settings()
    assert settings.server.api.auth_string.get_secret_value() == "team:server-secret"
    assert settings.api.auth_string.get_secret_value() == "team:client-secret"
    assert str(settings.home) == server["PREFECT_HOME"]
    assert settings.server.ui.static_directory == server["PREFECT_SERVER_UI_STATIC_DIRECTORY"]


def test_every_container_is_hardened(services):
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], f"{name} keeps Linux capabilities"
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("privileged"), name


def test_no_service_runs_as_root_but_the_volume_owners_job(services):
    for name, service in services.items():
        if name != "volume-owners":
            assert service_user(name, service).split(":")[0] not in ("root", "0"), f"{name} runs as root"


def test_volume_owners_job_can_only_chown_the_data_volumes(compose, services):
    job = services["volume-owners"]
    assert job["cap_add"] == ["CHOWN"] and job["network_mode"] == "none"
    assert not job.get("environment") and not job.get("ports"), "it needs no secret and serves nothing"
    mounted = {volume.split(":")[0] for volume in job["volumes"]}
    assert mounted <= set(compose["volumes"]) - {"postgres-data"}  # postgres' own image owns its volume
    script = " ".join(as_list(job["command"]))
    uid = last_user(MLFLOW_DOCKERFILE)
    assert f"chown -R {uid}" in script
    # Every service writing to these volumes runs as that uid.
    for name, service in services.items():
        uses = {str(v).split(":")[0] for v in service.get("volumes") or []} & mounted
        if uses and name != "volume-owners":
            assert service_user(name, service) == uid, f"{name} writes {uses} as another user"
            assert service["depends_on"]["volume-owners"]["condition"] == "service_completed_successfully", name


@pytest.mark.parametrize("dockerfile", [MLFLOW_DOCKERFILE, WORKER_DOCKERFILE], ids=["mlflow", "worker"])
def test_images_run_as_an_unprivileged_numeric_user(dockerfile, job_template):
    uid, _, gid = last_user(dockerfile).partition(":")
    # Numeric: Kubernetes' runAsNonRoot can only verify a numeric image user.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    pod = job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)


def test_each_service_has_its_own_minio_user(services):
    users = {}
    for name in ("mlflow", "prefect-worker"):
        env = env_of(services[name])
        key, secret = VAR_REF.fullmatch(env["AWS_ACCESS_KEY_ID"]), VAR_REF.fullmatch(env["AWS_SECRET_ACCESS_KEY"])
        assert key and secret, f"{name}'s MinIO keys must come from .env"
        assert not key.group(1).startswith("MINIO_ROOT") and not secret.group(1).startswith("MINIO_ROOT"), name
        users[name] = key.group(1)
    assert users["mlflow"] != users["prefect-worker"]


def test_only_minio_init_uses_the_minio_root_account(services):
    # minio itself defines the account; secrets-check only reads the password, without a network.
    holders = {name for name, service in services.items() if "MINIO_ROOT" in yaml.safe_dump(service)}
    assert holders == {"minio", "minio-init", "secrets-check"}
    assert services["secrets-check"]["network_mode"] == "none"


def policy_buckets(bucket: str) -> set[str]:
    """The buckets MinIO policy minio/policies/BUCKET.json reaches (each Resource names one bucket, no wildcard)."""
    buckets = set()
    for statement in json.loads((INFRA / "minio" / "policies" / f"{bucket}.json").read_text())["Statement"]:
        assert statement["Effect"] == "Allow"
        assert all(action.startswith("s3:") and action != "s3:*" for action in statement["Action"])
        for resource in statement["Resource"]:
            match = re.fullmatch(r"arn:aws:s3:::([a-z0-9.-]+)(/\*)?", resource)
            assert match, f"{bucket}.json: {resource} reaches beyond one bucket"
            buckets.add(match.group(1))
    return buckets


def run_minio_init(tmp_path: Path, services: dict, attach_error: str = "") -> tuple[subprocess.CompletedProcess, str]:
    """minio/init.sh under sh, with a stand-in `mc` that logs its arguments and can fail `policy attach`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mc").write_text('#!/bin/sh\necho "$*" >> "$MC_LOG"\n'
                                'case "$*" in "admin policy attach "*) [ -z "$ATTACH_ERROR" ] || '
                                '{ echo "$ATTACH_ERROR" >&2; exit 1; } ;; esac\n')
    (bin_dir / "mc").chmod(0o755)
    log = tmp_path / "mc.log"
    log.write_text("")
    # Each variable minio-init receives, valued by its name: the log shows which went where.
    env = {name: VAR_REF.fullmatch(value).group(1).lower() for name, value in env_of(services["minio-init"]).items()
           if VAR_REF.fullmatch(value)}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", MC_LOG=str(log), ATTACH_ERROR=attach_error)
    return subprocess.run(["sh", str(MINIO_INIT)], env=env, capture_output=True, text=True), log.read_text()


def test_minio_init_limits_each_service_user_to_its_bucket(tmp_path, services):
    done, calls = run_minio_init(tmp_path, services)
    assert done.returncode == 0, done.stderr
    assert "alias set team http://minio:9000 minio_root_user minio_root_password" in calls
    mlflow_bucket = option(as_list(services["mlflow"]["command"]), "--artifacts-destination").removeprefix("s3://")
    wanted = {"mlflow": mlflow_bucket.strip("/"), "prefect-worker": "dvc"}  # dvc: the README's team DVC remote
    for service, bucket in wanted.items():
        user = VAR_REF.fullmatch(env_of(services[service])["AWS_ACCESS_KEY_ID"]).group(1).lower()
        attached = re.findall(rf"^admin policy attach team (\S+) --user {user}$", calls, re.MULTILINE)
        assert len(attached) == 1, f"{service}'s MinIO user gets policies {attached}"
        created = re.search(rf"^admin policy create team {attached[0]} (\S+)$", calls, re.MULTILINE)
        assert created and Path(created.group(1)).name == f"{bucket}.json"
        assert policy_buckets(bucket) == {bucket}, f"{service}'s policy reaches {policy_buckets(bucket)}"
        assert re.search(rf"^mb --ignore-existing team/{bucket}$", calls, re.MULTILINE), f"no bucket {bucket}"


def test_minio_init_is_idempotent_and_stops_on_real_errors(tmp_path, services):
    # mc answers a repeated attach with an error (minio/mc#4863): on the next `up` that means done.
    again, _ = run_minio_init(tmp_path, services, attach_error="mc: <ERROR> Unable to make user/group policy "
                              "association. The specified policy change is already in effect.")
    assert again.returncode == 0, again.stderr
    denied, _ = run_minio_init(tmp_path, services, attach_error="mc: <ERROR> Access Denied.")
    assert denied.returncode != 0 and "Access Denied" in denied.stderr


def test_long_running_services_wait_for_the_secrets_check(services):
    for name in LONG_RUNNING:
        condition = services[name]["depends_on"]["secrets-check"]["condition"]
        assert condition == "service_completed_successfully", name


def test_secrets_check_sees_every_secret_and_refuses_unset_ones(compose_text, services):
    check = env_of(services["secrets-check"])
    secrets = {name for name in compose_vars(compose_text) if SECRET_KEY.search(name)}
    assert {VAR_REF.fullmatch(value).group(1) for value in check.values()} == secrets
    for name, value in check.items():
        # docker compose refuses to start while a :? variable is unset or empty.
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", value), f"secrets-check {name}: {value}"


def run_check_secrets(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(CHECK_SECRETS)], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True)


def test_secrets_check_refuses_change_me_placeholders(services):
    example = env_example_vars()
    check = env_of(services["secrets-check"])
    env = {name: example[VAR_REF.fullmatch(value).group(1)] for name, value in check.items()}
    refused = run_check_secrets(env)
    assert refused.returncode == 1
    assert all(name in refused.stderr for name in env), refused.stderr
    assert refused.stderr.startswith("infra/.env") and refused.stderr.count("\n") == 1, "one paragraph"

    replaced = dict(env, POSTGRES_PASSWORD="Vq3-postgres-secret")
    still = run_check_secrets(replaced)
    assert still.returncode == 1 and "POSTGRES_PASSWORD" not in still.stderr and "MLFLOW_ADMIN_PASSWORD" in still.stderr

    real = {name: f"{name.lower()}:Vq3-real-secret" for name in env}
    assert run_check_secrets(real).returncode == 0


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
    for name in ("MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING", "AWS_SECRET_ACCESS_KEY"):
        assert "valueFrom" in env[name] and "value" not in env[name], f"{name} comes from a Kubernetes secret"
    assert rendered["job_manifest"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_k8s_job_runs_unprivileged(job_template):
    pod = job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0 and pod["securityContext"]["runAsGroup"] > 0
    assert pod["automountServiceAccountToken"] is False, "flows do not call the Kubernetes API"
    context = _container(job_template["job_configuration"])["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}


def test_readme_covers_setup():
    readme = (INFRA / "README.md").read_text()
    for needle in ("cp .env.example .env", "docker compose up -d", "MLFLOW_TRACKING_URI=https://",
                   "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL=https://",
                   "PREFECT_API_AUTH_STRING=", "dvc remote add -d team s3://dvc",
                   "dvc remote modify team endpointurl https://",
                   "grant_user_permission", "docker compose logs secrets-check", "SEGFLOW_BIND",
                   "prefect work-pool create", "--base-job-template infra/k8s/base-job-template.json"):
        assert needle in readme, needle


def test_readme_proxy_forwards_every_published_port(services):
    """The reverse proxy the README describes reaches each port the stack publishes on 127.0.0.1."""
    readme = (INFRA / "README.md").read_text()
    proxied = {int(port) for port in re.findall(r"reverse_proxy 127\.0\.0\.1:(\d+)", readme)}
    assert proxied == set().union(*(published_ports(service) for service in services.values()))
