"""deploy/ stays valid and agrees with the code and the README, without Docker or a cluster.

How each file is checked:

- The core Kubernetes objects (Deployment, Service, Secret, PersistentVolumeClaim, HorizontalPodAutoscaler
  v2, the LeaderWorkerSet's Service) are validated by kubernetes-validate, which bundles JSON schemas made
  from Kubernetes' OpenAPI, in strict mode (an unknown or misspelt field fails), against the oldest and the
  newest Kubernetes versions it bundles (K8S_VERSIONS).
- The LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) is a custom resource kubernetes-validate has no schema
  for. Its two pod templates are what matters most, and the LWS API types them as core PodTemplateSpecs
  (corev1.PodTemplateSpec in its leaderworkerset_types.go): each is wrapped in a v1 PodTemplate object and
  validated strictly like the rest. The fields around them (spec, spec.leaderWorkerTemplate) are checked by
  hand against LWS v1's types in `lws_problems`: only known keys, the enums, a positive size. What LWS's own
  admission webhook would add or refuse beyond that is not checked: there is no LWS controller here.
- kustomization.yaml is checked by hand: its resources exist and are the core files.
- The Dockerfile is parsed with BuildKit's own parser (the `dockerfile` package wraps it): its pip installs
  must be the README's, the entry point `tp-embed` in exec form.

And across files: every flag the manifests and the Dockerfile pass exists in tp_embed's parser (torchrun's in
torch's), the grace periods cover the drain, the probes ask /health on the port the server listens on, the
Secret feeds $TP_EMBED_API_KEY, the HPA's metric is one tp_embed/metrics.py exports, the GPUs requested are
the ranks started, and the tp fits the preset's model.
"""

import copy
import glob
import json
import os
import re
import shlex
from importlib.metadata import entry_points

import dockerfile
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from server_utils import REPO
from tp_embed.command import GRACE_S
from tp_embed.launch import build_parser

DEPLOY = os.path.join(REPO, "deploy")
K8S = os.path.join(DEPLOY, "kubernetes")
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
MANIFESTS = sorted(glob.glob(os.path.join(K8S, "*.yaml")))
# the oldest and the newest Kubernetes whose schemas kubernetes-validate bundles
K8S_VERSIONS = (all_versions()[0], kubernetes_validate.latest_version())
LWS_API = "leaderworkerset.x-k8s.io/v1"
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
# what the kubelet substitutes for LWS's variables in a pod's args, for parsing them here
LWS_ENV = {"LWS_WORKER_INDEX": "1", "LWS_LEADER_ADDRESS": "tp-embed-multinode-0.tp-embed-multinode.default",
           "LWS_GROUP_SIZE": "2"}


def load(name: str) -> list[dict]:
    with open(os.path.join(K8S, name), encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(name: str, kind: str) -> dict:
    found = [d for d in load(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def all_docs() -> list[tuple[str, dict]]:
    return [(os.path.basename(path), doc) for path in MANIFESTS for doc in load(os.path.basename(path))]


def kubernetes_objects() -> list[tuple[str, dict]]:
    """Every document kubernetes-validate has a schema for: all but the LeaderWorkerSet and kustomize's file."""
    return [(name, d) for name, d in all_docs() if d["apiVersion"] not in (LWS_API, KUSTOMIZE_API)]


def deployment() -> dict:
    return one("deployment.yaml", "Deployment")


def lws() -> dict:
    return one("leaderworkerset.yaml", "LeaderWorkerSet")


def lws_templates() -> dict[str, dict]:
    t = lws()["spec"]["leaderWorkerTemplate"]
    return {"leader": t["leaderTemplate"], "worker": t["workerTemplate"]}


def container(pod_spec: dict, name: str = "tp-embed") -> dict:
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no single container {name!r}"
    return found[0]


def substitute(words: list[str]) -> list[str]:
    """The kubelet's $(VAR) expansion, for LWS's variables."""
    return [re.sub(r"\$\((\w+)\)", lambda m: LWS_ENV[m.group(1)], w) for w in words]


def split_torchrun(c: dict) -> tuple[object, list[str]]:
    """(torchrun's parsed flags, tp_embed.launch's argv) of an LWS container, parsed by torch's own parser."""
    from torch.distributed.run import get_args_parser

    assert c["command"] == ["python", "-m", "torch.distributed.run"], c["command"]
    run_args = get_args_parser().parse_args(substitute(c["args"]))
    assert run_args.module and run_args.training_script == "tp_embed.launch", (
        "torchrun must start the server's module: `-m tp_embed.launch`")
    return run_args, list(run_args.training_script_args)


def server_argv(name: str) -> list[str]:
    """The tp-embed flags a manifest passes."""
    if name == "deployment":
        c = container(deployment()["spec"]["template"]["spec"])
        assert c["command"] == ["tp-embed"], c["command"]
        return list(c["args"])
    return split_torchrun(container(lws_templates()[name]["spec"]))[1]


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} must be given once in {argv}"
    return argv[argv.index(name) + 1]


def pre_stop_seconds(c: dict) -> float:
    """The seconds a `sleep N` preStop hook holds SIGTERM back (0 without one)."""
    hook = c.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"expected preStop `sleep N`, got {command}"
    return float(command[1])


# --- schemas -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name, doc", kubernetes_objects(),
                         ids=[f"{n}:{d['kind']}" for n, d in kubernetes_objects()])
def test_core_objects_validate(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def as_pod_template(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("role", ["leader", "worker"])
def test_leaderworkerset_pod_templates_validate(role, version):
    kubernetes_validate.validate(as_pod_template(lws_templates()[role], f"lws-{role}"), version, strict=True)


# LWS v1's fields (api/leaderworkerset/v1/leaderworkerset_types.go) and the enums it declares
LWS_SPEC_KEYS = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE_KEYS = {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy",
                     "volumeClaimTemplates", "persistentVolumeClaimRetentionPolicy"}
LWS_STARTUP_POLICIES = {"LeaderCreated", "LeaderReady"}
LWS_RESTART_POLICIES = {"RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None", "Default"}


def lws_problems(doc: dict) -> list[str]:
    """What is wrong with a LeaderWorkerSet's fields outside its pod templates, by LWS v1's types."""
    problems = []
    if doc.get("apiVersion") != LWS_API or doc.get("kind") != "LeaderWorkerSet":
        problems.append(f"apiVersion/kind: {doc.get('apiVersion')}/{doc.get('kind')}")
    if set(doc) - {"apiVersion", "kind", "metadata", "spec"}:
        problems.append(f"unknown top-level fields {sorted(set(doc) - {'apiVersion', 'kind', 'metadata', 'spec'})}")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc.get("metadata", {}).get("name", "")):
        problems.append("metadata.name must be a DNS label (it names the pods and the headless Service)")
    spec = doc.get("spec", {})
    if set(spec) - LWS_SPEC_KEYS:
        problems.append(f"unknown spec fields {sorted(set(spec) - LWS_SPEC_KEYS)}")
    if not isinstance(spec.get("replicas", 1), int) or spec.get("replicas", 1) < 0:
        problems.append("spec.replicas must be a non-negative integer")
    if spec.get("startupPolicy", "LeaderCreated") not in LWS_STARTUP_POLICIES:
        problems.append(f"spec.startupPolicy {spec.get('startupPolicy')!r} not in {sorted(LWS_STARTUP_POLICIES)}")
    template = spec.get("leaderWorkerTemplate", {})
    if set(template) - LWS_TEMPLATE_KEYS:
        problems.append(f"unknown leaderWorkerTemplate fields {sorted(set(template) - LWS_TEMPLATE_KEYS)}")
    if "workerTemplate" not in template:
        problems.append("leaderWorkerTemplate.workerTemplate is required")
    if not isinstance(template.get("size", 1), int) or template.get("size", 1) < 1:
        problems.append("leaderWorkerTemplate.size must be an integer >= 1")
    if template.get("restartPolicy", "RecreateGroupOnPodRestart") not in LWS_RESTART_POLICIES:
        problems.append(f"leaderWorkerTemplate.restartPolicy {template.get('restartPolicy')!r} "
                        f"not in {sorted(LWS_RESTART_POLICIES)}")
    return problems


def test_leaderworkerset_fields():
    doc = lws()
    assert lws_problems(doc) == []
    # the group cannot become ready before the worker joins: LeaderReady would never start the worker
    assert doc["spec"]["startupPolicy"] == "LeaderCreated"
    # a group missing a rank cannot compute: a failed pod recreates the group
    assert doc["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"


def test_the_checks_catch_mistakes():
    """The validation above fails on a misspelt field, in a core object and in the LWS alike."""
    bad = copy.deepcopy(deployment())
    container(bad["spec"]["template"]["spec"])["livenessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = copy.deepcopy(lws_templates()["worker"])
    bad["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_pod_template(bad, "w"), K8S_VERSIONS[-1], strict=True)
    bad = copy.deepcopy(lws())
    bad["spec"]["leaderWorkerTemplate"]["leaderTemplates"] = bad["spec"]["leaderWorkerTemplate"].pop("leaderTemplate")
    bad["spec"]["startupPolicy"] = "LeaderStarted"
    assert len(lws_problems(bad)) == 2, lws_problems(bad)


def test_kustomization_lists_the_core_resources():
    k = one("kustomization.yaml", "Kustomization")
    assert k["apiVersion"] == KUSTOMIZE_API
    listed = k["resources"]
    for name in listed:
        assert os.path.isfile(os.path.join(K8S, name)), f"kustomization.yaml lists {name}, which does not exist"
    # everything but the example Secret (it would overwrite a real key), the LWS (a CRD, an alternative to
    # the replicas) and the kustomization itself
    expected = {os.path.basename(p) for p in MANIFESTS} - {"secret.yaml", "leaderworkerset.yaml", "kustomization.yaml"}
    assert set(listed) == expected


# --- the image -----------------------------------------------------------------------------------------

def docker_commands() -> list:
    return list(dockerfile.parse_file(DOCKERFILE))


def pip_installs(shell: str) -> list[tuple[str, ...]]:
    """The `pip install ...` commands in a line of shell, as word tuples (`python -m pip install` as well)."""
    found = []
    for part in re.split(r"&&|\|\||;|\n", shell):
        words = shlex.split(part)
        if words[:1] and words[0].startswith("python") and words[1:3] == ["-m", "pip"]:
            words = words[2:]
        if words[:2] == ["pip", "install"]:
            found.append(tuple(words))
    return found


def readme_pip_installs() -> list[tuple[str, ...]]:
    """Every `pip install` in README.md, in code blocks and inline code (up to `&&` or the closing backtick)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return [tuple(shlex.split(m)) for m in re.findall(r"pip install [^`&\n]+", text)]


def dockerfile_pip_installs() -> list[tuple[str, ...]]:
    found = []
    for c in docker_commands():
        if c.cmd == "RUN":
            assert not c.json, "RUN in exec form: write pip installs in shell form"
            found += pip_installs(" ".join(c.value))
    return found


def test_dockerfile_installs_as_the_readme():
    readme = readme_pip_installs()
    torch = sorted({c for c in readme if any(w.startswith("torch==") for w in c)})
    gpu = sorted({c for c in readme if any(w.startswith(".[gpu") for w in c)})
    assert len(torch) == 1, f"README.md should pin torch one way, found {torch}"
    assert len(gpu) == 1, f"README.md should install the gpu extra one way, found {gpu}"
    # torch first (pinned as the README pins it), then the project with the gpu extra, and nothing else
    assert dockerfile_pip_installs() == [torch[0], gpu[0]], (
        f"deploy/Dockerfile's pip installs drifted from README.md's {torch[0]} and {gpu[0]}")


def test_pip_installs_are_found():
    assert pip_installs('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.0 && '
                        'python -m pip install -e ".[gpu]"') == [("pip", "install", "torch==2.0"),
                                                                   ("pip", "install", "-e", ".[gpu]")]


def test_entry_point_is_the_tp_embed_command():
    commands = docker_commands()
    entry = [c for c in commands if c.cmd == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0].json, "one ENTRYPOINT, in exec form, so that SIGTERM reaches tp-embed"
    assert entry[0].value[0] == "tp-embed"
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("tp-embed") == "tp_embed.command:cli", "tp-embed is not the project's command"
    cmd = [c for c in commands if c.cmd == "CMD"]
    assert len(cmd) == 1 and cmd[0].json
    assert [c for c in commands if c.cmd == "USER"][-1].value[0].split(":")[0] not in ("root", "0")
    assert "30000" in [c for c in commands if c.cmd == "EXPOSE"][0].value
    health = [c for c in commands if c.cmd == "HEALTHCHECK"]
    assert len(health) == 1 and "127.0.0.1:30000/health" in " ".join(health[0].value)
    # the pods run the same command, or torchrun with the server's module
    assert container(deployment()["spec"]["template"]["spec"])["command"] == ["tp-embed"]
    for template in lws_templates().values():
        split_torchrun(container(template["spec"]))


def test_dockerignore_keeps_local_environments_out():
    with open(os.path.join(REPO, ".dockerignore"), encoding="utf-8") as f:
        patterns = {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "*.egg-info", "build"} <= patterns


# --- flags ---------------------------------------------------------------------------------------------

def dockerfile_argv() -> list[str]:
    commands = docker_commands()
    entry = [c for c in commands if c.cmd == "ENTRYPOINT"][0].value
    cmd = [c for c in commands if c.cmd == "CMD"][0].value
    return list(entry[1:]) + list(cmd)


ARGV_SOURCES = {"Dockerfile": dockerfile_argv, "deployment": lambda: server_argv("deployment"),
                "lws leader": lambda: server_argv("leader"), "lws worker": lambda: server_argv("worker")}


@pytest.mark.parametrize("source", ARGV_SOURCES)
def test_flags_exist_in_tp_embed(source, capsys):
    argv = ARGV_SOURCES[source]()
    parser = build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    # spelt out in full: argparse would also take a prefix, which a later flag could make ambiguous
    unknown = [w.split("=")[0] for w in argv if w.startswith("--") and w.split("=")[0] not in known]
    assert not unknown, f"{source}: flags tp_embed's parser does not have: {unknown}"
    try:
        parser.parse_args(argv)  # types and choices (--config is a name, not opened here)
    except SystemExit:
        pytest.fail(f"{source}: tp_embed's parser refuses {argv}: {capsys.readouterr().err}")


def test_flag_check_fails_on_an_unknown_flag():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--shutdown-timeout", "25", "--drain-seconds", "3"])


# --- shutdown and probes -------------------------------------------------------------------------------

def pods() -> dict[str, dict]:
    """The pod templates that serve HTTP, and the LWS worker's."""
    t = lws_templates()
    return {"deployment": deployment()["spec"]["template"], "leader": t["leader"], "worker": t["worker"]}


@pytest.mark.parametrize("role", ["deployment", "leader", "worker"])
def test_grace_period_covers_the_drain(role):
    pod = pods()[role]["spec"]
    c = container(pod)
    grace = pod["terminationGracePeriodSeconds"]
    drain = float(flag(server_argv(role), "--shutdown-timeout"))
    if role == "deployment":
        # tp-embed: rank 0 drains for --shutdown-timeout, then the other ranks get GRACE_S to stop
        stop = drain + GRACE_S
    else:
        # torchrun kills its ranks after its own --shutdown-timeout: it must outlast the drain and the stop
        run_args, _ = split_torchrun(c)
        assert run_args.shutdown_timeout is not None, "pass torchrun --shutdown-timeout (its default is 30 s)"
        assert run_args.shutdown_timeout > drain + GRACE_S, (
            f"torchrun's --shutdown-timeout {run_args.shutdown_timeout} would kill a drain of {drain} s")
        stop = run_args.shutdown_timeout
    assert grace > pre_stop_seconds(c) + stop, (
        f"{role}: terminationGracePeriodSeconds {grace} <= preStop {pre_stop_seconds(c)} + {stop} s of shutdown")


def test_leader_and_worker_stop_in_step():
    """Both pods of a group get SIGTERM after the same preStop, so the worker's torchrun does not give up on
    ranks that wait for the leader's drain."""
    t = lws_templates()
    assert pre_stop_seconds(container(t["leader"]["spec"])) == pre_stop_seconds(container(t["worker"]["spec"]))


def test_docker_run_stop_timeout_covers_the_drain():
    with open(DOCKERFILE, encoding="utf-8") as f:
        text = f.read()
    stop = re.search(r"--stop-timeout (\d+)", text)
    assert stop, "the Dockerfile's `docker run` line should set --stop-timeout (Docker's default is 10 s)"
    drain = build_parser().get_default("shutdown_timeout")
    assert int(stop.group(1)) > drain + GRACE_S


@pytest.mark.parametrize("role", ["deployment", "leader"])
def test_probes_ask_health_on_the_server_port(role):
    pod = pods()[role]["spec"]
    c = container(pod)
    port = int(flag(server_argv(role), "--port"))
    assert flag(server_argv(role), "--host") == "0.0.0.0", "the kubelet and the Service reach the pod's IP"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        assert probe["httpGet"]["path"] == "/health", kind
        target = probe["httpGet"]["port"]
        assert ports.get(target, target) == port, f"{kind} asks port {target}, the server listens on {port}"
    # loading a 7B model (and downloading it, and FlashInfer's first compile) takes minutes
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # /health is 503 while draining: liveness must not fail within the whole shutdown
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > pod["terminationGracePeriodSeconds"]


def test_the_worker_serves_no_http():
    c = container(lws_templates()["worker"]["spec"])
    assert not {"startupProbe", "readinessProbe", "livenessProbe", "ports"} & set(c)


@pytest.mark.parametrize("name, pod_role", [("service.yaml", "deployment"), ("leaderworkerset.yaml", "leader")])
def test_services_select_the_serving_pods(name, pod_role):
    service = one(name, "Service")
    labels = pods()[pod_role]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    if pod_role == "leader":  # not the worker, which serves no HTTP
        assert not service["spec"]["selector"].items() <= pods()["worker"]["metadata"]["labels"].items()
    c = container(pods()[pod_role]["spec"])
    names = {p["name"] for p in c["ports"]}
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in names and p["port"] == int(flag(server_argv(pod_role), "--port"))


# --- the API key ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["deployment", "leader"])
def test_the_secret_feeds_the_api_key(role, monkeypatch):
    secret = one("secret.yaml", "Secret")
    env = {e["name"]: e for e in container(pods()[role]["spec"])["env"]}
    ref = env["TP_EMBED_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert not ref.get("optional"), "a server meant to have a key must not start without one"
    # and that variable is the one tp_embed's flags read
    monkeypatch.setenv("TP_EMBED_API_KEY", "from-the-secret")
    assert build_parser().parse_args([]).api_key == "from-the-secret"


# --- autoscaling ---------------------------------------------------------------------------------------

def test_hpa_scales_on_a_metric_tp_embed_exports():
    from tp_embed.metrics import Metrics

    hpa = one("hpa.yaml", "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    d = deployment()
    assert (target["kind"], target["name"]) == (d["kind"], d["metadata"]["name"])
    assert "replicas" not in d["spec"], "the HPA owns the replica count; a value in the Deployment resets it"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    exported = {m.name: m.type for m in Metrics().registry.collect()}
    assert exported.get(name) == "gauge", f"{name} is not a gauge of tp_embed/metrics.py: {sorted(exported)}"
    with open(os.path.join(K8S, "hpa.yaml"), encoding="utf-8") as f:
        assert f"seriesQuery: '{name}{{" in f.read(), "the prometheus-adapter rule in hpa.yaml names another series"


# --- GPUs, ranks and tp --------------------------------------------------------------------------------

def gpus(c: dict) -> int:
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert int(requests["nvidia.com/gpu"]) == int(limits["nvidia.com/gpu"])
    return int(limits["nvidia.com/gpu"])


def ranks(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.tp * args.dp


def test_deployment_gpus_are_its_ranks():
    c = container(deployment()["spec"]["template"]["spec"])
    assert gpus(c) == ranks(server_argv("deployment"))


@pytest.mark.parametrize("role", ["leader", "worker"])
def test_leaderworkerset_gpus_are_its_ranks(role):
    c = container(lws_templates()[role]["spec"])
    run_args, argv = split_torchrun(c)
    size = lws()["spec"]["leaderWorkerTemplate"]["size"]
    assert run_args.nnodes == str(size), "torchrun's --nnodes is the group's size"
    assert int(run_args.nproc_per_node) == gpus(c)
    assert size * gpus(c) == ranks(argv)
    assert run_args.node_rank == int(LWS_ENV["LWS_WORKER_INDEX"])
    assert run_args.master_addr == LWS_ENV["LWS_LEADER_ADDRESS"]


def test_leader_and_worker_run_one_command():
    t = lws_templates()
    leader, worker = container(t["leader"]["spec"]), container(t["worker"]["spec"])
    assert (leader["image"], leader["command"], leader["args"]) == (worker["image"], worker["command"], worker["args"])


def preset(name: str) -> dict:
    """A preset by the name `--config` takes: NAME.json in configs/ or in the package."""
    found = [p for d in ("configs", "tp_embed") for p in glob.glob(os.path.join(REPO, d, "**", f"{name}.json"),
                                                                  recursive=True)]
    assert found, f"--config {name}: no preset {name}.json in configs/ or tp_embed/"
    with open(found[0], encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("role", ["deployment", "leader"])
def test_tp_fits_the_presets_model(role, tmp_path):
    """The engine accepts the manifest's tp for the preset's heads (as tests/test_configs.py checks presets)."""
    from tp_embed.models import load_config

    argv = server_argv(role)
    p = preset(flag(argv, "--config"))
    heads, kv_heads = p["_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["MistralModel"], "model_type": "mistral", "hidden_size": heads * 8,
         "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": 1,
         "intermediate_size": 16, "vocab_size": 100}))
    load_config(str(tmp_path), tp_size=int(flag(argv, "--tp")))
