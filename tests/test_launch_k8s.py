"""launch/k8s_jobset_gpu.yaml and launch/k8s_jobset_tpu.yaml, rendered as the README says.

What is checked, without a cluster:

- the fields the JobSet v1alpha2 CRD and the batch/v1 Job require, and the values the JobSet
  webhook and the Job API accept (names and enums as in kubernetes-sigs/jobset
  api/jobset/v1alpha2/jobset_types.go, pkg/webhooks/jobset_webhook.go and the CRD
  config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml, v0.6.0 and later);
- the restart contract, by evaluating the rules as the Job and JobSet controllers do: esmjax's exit
  75 (stopped with a checkpoint) or an eviction restarts the JobSet without counting against
  maxRestarts, any other failure restarts it at most maxRestarts times, exit 0 completes it;
- the process group: every pod's environment (the manifest's values, the downward API fields the
  JobSet controller sets, Kubernetes' $(VAR) expansion, JOB_COMPLETION_INDEX) goes through
  esmjax.parallel.distributed.start_args, over replicas x parallelism pods;
- the container command itself, run by bash with a stand-in `esmjax` that records its arguments,
  which esmjax's own parser and config loader then read.

ESMJAX_JOBSET_CRD=<path to jobset.x-k8s.io_jobsets.yaml> also validates both manifests against the
CRD's OpenAPI schema, with unknown fields refused (the CRD is not vendored: it is ~800 kB).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from esmjax.parallel import distributed, xla_flags
from esmjax.train.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "launch" / "k8s_jobset_gpu.yaml"
TPU = ROOT / "launch" / "k8s_jobset_tpu.yaml"
IMAGE = "registry.example/esmjax:test"

# pkg/webhooks/jobset_webhook.go (validOnJobFailureReasons, ruleNameFmt); jobset_types.go enums.
JOB_FAILURE_REASONS = {
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "FailedIndexes",
    "MaxFailedIndexesExceeded",
    "PodFailurePolicy",
}
JOBSET_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"}
RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
# batch/v1 PodFailurePolicyRule.action and PodFailurePolicyOnExitCodesRequirement.operator.
POD_ACTIONS = {"FailJob", "FailIndex", "Ignore", "Count"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def render(path: Path, image: str = IMAGE) -> str:
    """``envsubst '${IMAGE}'``: only $IMAGE / ${IMAGE} are replaced."""
    return re.sub(r"\$\{IMAGE\}|\$IMAGE\b", image, path.read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(render(path))


def job_spec(rjob: dict) -> dict:
    return rjob["template"]["spec"]


def pod_spec(rjob: dict) -> dict:
    return job_spec(rjob)["template"]["spec"]


def esmjax_container(rjob: dict) -> dict:
    (c,) = [c for c in pod_spec(rjob)["containers"] if c["name"] == "esmjax"]
    return c


def script(rjob: dict) -> str:
    cmd = esmjax_container(rjob)["command"]
    assert cmd[:2] == ["bash", "-c"] and len(cmd) == 3, cmd
    return cmd[2]


def subdomain(doc: dict) -> str:
    return doc["spec"].get("network", {}).get("subdomain") or doc["metadata"]["name"]


def pod_hostname(doc: dict, rjob: dict, job: int, pod: int) -> str:
    """The pod's DNS name with network.enableDNSHostnames (jobset_types.go, Network)."""
    return f"{doc['metadata']['name']}-{rjob['name']}-{job}-{pod}.{subdomain(doc)}"


def pod_env(doc: dict, rjob: dict, job: int, pod: int) -> dict[str, str]:
    """The environment Kubernetes gives pod ``pod`` of Job ``job``: the container's env in order,
    fieldRefs read from the labels/annotations the JobSet controller puts on the pod template
    (labelAndAnnotateObject), $(VAR) expanded from the variables before it, then
    JOB_COMPLETION_INDEX, which the Job controller appends for an Indexed Job."""
    meta = {
        "jobset.sigs.k8s.io/jobset-name": doc["metadata"]["name"],
        "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
        "jobset.sigs.k8s.io/replicatedjob-replicas": str(rjob["replicas"]),
        "jobset.sigs.k8s.io/job-index": str(job),
    }
    annotations = {**meta, "batch.kubernetes.io/job-completion-index": str(pod)}
    env: dict[str, str] = {}
    for var in esmjax_container(rjob).get("env", []):
        if "valueFrom" in var:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
            assert m, f"{var['name']}: fieldPath {path} is not one this test knows"
            env[var["name"]] = (meta if m[1] == "labels" else annotations)[m[2]]
        else:
            env[var["name"]] = expand(var["value"], env)
    env["JOB_COMPLETION_INDEX"] = str(pod)
    return env


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' dependent variables: $(NAME) of a variable defined before, $$ -> $."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]),
        value,
    )


def pods(doc: dict):
    for rjob in doc["spec"]["replicatedJobs"]:
        for job in range(rjob["replicas"]):
            for pod in range(job_spec(rjob)["parallelism"]):
                yield rjob, job, pod, pod_env(doc, rjob, job, pod)


def resized(doc: dict, replicas: int, parallelism: int) -> dict:
    """The GPU manifest as its header tells a user to change it."""
    doc = copy.deepcopy(doc)
    (rjob,) = doc["spec"]["replicatedJobs"]
    rjob["replicas"] = replicas
    job_spec(rjob).update(parallelism=parallelism, completions=parallelism)
    values = {
        "ESMJAX_PROCESSES_PER_JOB": str(parallelism),
        "ESMJAX_NUM_PROCESSES": str(replicas * parallelism),
    }
    for var in esmjax_container(rjob)["env"]:
        if var["name"] in values:
            var["value"] = values[var["name"]]
    return doc


# --- what the controllers do with a failure ------------------------------------------------------


def pod_failure_action(job: dict, container: str, exit_code: int, conditions=()) -> str:
    """batch/v1 podFailurePolicy: the first rule that matches a failed pod (exit code 0 never
    matches an exit-code rule), else Count (the failure counts against backoffLimit)."""
    for rule in job.get("podFailurePolicy", {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if codes and exit_code != 0 and codes.get("containerName") in (None, container):
            inside = exit_code in codes["values"]
            if inside == (codes["operator"] == "In"):
                return rule["action"]
        for pattern in rule.get("onPodConditions") or []:
            if (pattern["type"], pattern.get("status", "True")) in conditions:
                return rule["action"]
    return "Count"


def job_failure_reason(job: dict, action: str, failures: int) -> str | None:
    """The reason of the Job's Failed condition after ``failures`` pod failures (None: none)."""
    if action == "FailJob":
        return "PodFailurePolicy"
    if action == "Count" and failures > job.get("backoffLimit", 6):
        return "BackoffLimitExceeded"
    return None


def jobset_action(doc: dict, rjob: str, reason: str) -> str:
    """JobSet failurePolicy: the first rule matching the Job's failure reason and replicatedJob,
    else RestartJobSet (jobset_types.go, FailurePolicy.Rules)."""
    for rule in doc["spec"].get("failurePolicy", {}).get("rules", []):
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        if rule.get("targetReplicatedJobs") and rjob not in rule["targetReplicatedJobs"]:
            continue
        return rule["action"]
    return "RestartJobSet"


def outcome(doc: dict, exit_code: int, conditions=()) -> str:
    """What the JobSet does when one esmjax pod ends with ``exit_code``."""
    (rjob,) = doc["spec"]["replicatedJobs"]
    if exit_code == 0 and not conditions:
        return "pod succeeded"
    action = pod_failure_action(job_spec(rjob), "esmjax", exit_code, conditions)
    reason = job_failure_reason(job_spec(rjob), action, failures=1)
    assert reason is not None, f"exit {exit_code}: the Job neither failed nor succeeded ({action})"
    return jobset_action(doc, rjob["name"], reason)


# --- the manifests -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [GPU, TPU], ids=["gpu", "tpu"])
def test_jobset_fields(path):
    text = render(path)
    assert "${" not in text.replace("${XLA_FLAGS:-}", "").replace("${LIBTPU_INIT_ARGS:-}", "")
    assert "$$" not in text
    header = path.read_text().split("\napiVersion:")[0]
    assert f"envsubst '${{IMAGE}}' < launch/{path.name}" in header
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    assert DNS1035.match(doc["metadata"]["name"])
    assert doc["spec"]["network"]["enableDNSHostnames"] is True
    rjobs = doc["spec"]["replicatedJobs"]
    assert rjobs and len({r["name"] for r in rjobs}) == len(rjobs)
    for rjob in rjobs:
        assert isinstance(rjob["replicas"], int) and rjob["replicas"] >= 1
        job = job_spec(rjob)
        assert job["completionMode"] == "Indexed"
        assert isinstance(job["parallelism"], int) and job["completions"] == job["parallelism"]
        assert job["backoffLimit"] == 0
        # the longest pod name (+ the Job controller's 5-character suffix) must be a DNS-1035
        # label (jobset_webhook.go ValidateCreate)
        longest = f"{doc['metadata']['name']}-{rjob['name']}-{rjob['replicas'] - 1}-"
        longest += f"{job['completions'] - 1}-abcde"
        assert len(longest) <= 63 and DNS1035.match(longest), longest
        pod = pod_spec(rjob)
        assert pod["restartPolicy"] == "Never"  # podFailurePolicy refuses anything else
        assert pod["terminationGracePeriodSeconds"] >= 300  # a step plus a checkpoint save
        for c in pod["containers"]:
            assert c["name"] and c["image"] == IMAGE and c["command"]
            for var in c.get("env", []):
                assert ("value" in var) != ("valueFrom" in var), var
                assert isinstance(var.get("value", ""), str), f"{var['name']}: not a string"
        volumes = pod.get("volumes", [])
        assert not [v for v in volumes if "persistentVolumeClaim" in v]
        mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in volumes}
        assert "exec esmjax train " in script(rjob)


@pytest.mark.parametrize("path", [GPU, TPU], ids=["gpu", "tpu"])
def test_failure_policies(path):
    doc = load(path)
    fp = doc["spec"]["failurePolicy"]
    assert isinstance(fp["maxRestarts"], int) and 0 < fp["maxRestarts"] <= 20
    names = [r["name"] for r in fp["rules"]]
    assert len(set(names)) == len(names) and all(RULE_NAME.match(n) for n in names)
    for rule in fp["rules"]:
        assert rule["action"] in JOBSET_ACTIONS
        assert set(rule.get("onJobFailureReasons", [])) <= JOB_FAILURE_REASONS
    for rjob in doc["spec"]["replicatedJobs"]:
        containers = {c["name"] for c in pod_spec(rjob)["containers"]}
        for rule in job_spec(rjob)["podFailurePolicy"]["rules"]:
            assert rule["action"] in POD_ACTIONS
            codes = rule.get("onExitCodes")
            if codes:
                assert codes["operator"] in ("In", "NotIn") and codes["containerName"] in containers
                assert codes["values"] == sorted(set(codes["values"])) and 0 not in codes["values"]
            assert codes or rule["onPodConditions"]
            assert all(p["type"] for p in rule.get("onPodConditions", []))

    preempted = "RestartJobSetAndIgnoreMaxRestarts"
    assert outcome(doc, EXIT_PREEMPTED) == preempted
    # evicted (maintenance, spot, drain) and killed before it could save: exit 137 or 143
    assert outcome(doc, 137, [("DisruptionTarget", "True")]) == preempted
    assert outcome(doc, 143, [("DisruptionTarget", "True")]) == preempted
    for error in (1, 2, 137, 139):  # a traceback, a bad config, the OOM killer, a crash
        assert outcome(doc, error) == "RestartJobSet", error
    assert outcome(doc, 0) == "pod succeeded"


def test_gpu_pods():
    doc = load(GPU)
    (rjob,) = doc["spec"]["replicatedJobs"]
    pod = pod_spec(rjob)
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
    assert vol["emptyDir"]["medium"] == "Memory"


def check_process_group(doc: dict) -> list[tuple[int, int, int]]:
    """start_args over every pod: distinct ids 0..N-1, every pod naming job 0 pod 0 (process 0) as
    the coordinator. Returns (job index, completion index, process id) per pod."""
    (rjob,) = doc["spec"]["replicatedJobs"]
    n = rjob["replicas"] * job_spec(rjob)["parallelism"]
    ids = []
    for _, job, pod, env in pods(doc):
        assert int(env["ESMJAX_NUM_PROCESSES"]) == n
        assert int(env["ESMJAX_PROCESSES_PER_JOB"]) == job_spec(rjob)["parallelism"]
        if n == 1:  # one pod: a single process, nothing to start
            assert distributed.start_args(env) is None
            return [(0, 0, 0)]
        how, kwargs = distributed.start_args(env)
        assert how == "explicit" and kwargs["num_processes"] == n
        assert kwargs["coordinator_address"] == pod_hostname(doc, rjob, 0, 0) + ":1234"
        ids.append((job, pod, kwargs["process_id"]))
    assert sorted(p for _, _, p in ids) == list(range(n))
    assert [(j, i) for j, i, p in ids if p == 0] == [(0, 0)]
    return ids


@pytest.mark.parametrize("shape", [None, (2, 4), (3, 2), (1, 1)], ids=str)
def test_gpu_process_ids(shape):
    doc = load(GPU)
    check_process_group(doc if shape is None else resized(doc, *shape))


def test_gpu_replicas_do_not_reuse_completion_indices():
    """With 2 replicated Jobs, Job 1's pods have completion indices 0..p-1 again: the process id
    must not be the completion index alone (the scheme of the manifest before, which collides)."""
    doc = resized(load(GPU), 2, 4)
    ids = {}
    for _, job, pod, env in pods(doc):
        assert int(env["JOB_COMPLETION_INDEX"]) == pod
        _, kwargs = distributed.start_args(env)
        ids[job, pod] = kwargs["process_id"]
    assert [ids[1, i] for i in range(4)] == [4, 5, 6, 7]
    assert sorted(ids.values()) == list(range(8))


def test_tpu_pods(tmp_path):
    doc = load(TPU)
    assert doc["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == (
        "cloud.google.com/gke-nodepool"
    )
    for rjob in doc["spec"]["replicatedJobs"]:
        pod = pod_spec(rjob)
        selector = pod["nodeSelector"]
        assert selector["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
        assert re.fullmatch(r"\d+x\d+(x\d+)?", selector["cloud.google.com/gke-tpu-topology"])
        (c,) = pod["containers"]
        assert c["resources"]["limits"]["google.com/tpu"] == 4
        # 4 chips per host: the topology's chips are the Job's pods x 4
        chips = 1
        for side in selector["cloud.google.com/gke-tpu-topology"].split("x"):
            chips *= int(side)
        assert chips == 4 * job_spec(rjob)["parallelism"]
    for rjob, job, pod, env in pods(doc):
        assert not [k for k in env if k.startswith("ESMJAX_")], env
        # what GKE adds to each pod of a TPU slice's Indexed Job: its slice's hosts, its index
        n = job_spec(rjob)["parallelism"]
        hosts = ",".join(pod_hostname(doc, rjob, job, i) for i in range(n))
        env = {**env, "TPU_WORKER_HOSTNAMES": hosts, "TPU_WORKER_ID": str(pod)}
        assert distributed.tpu_vm_detected(env, sys_root=tmp_path)
        assert distributed.start_args(env, on_tpu_vm=True) == ("Cloud TPU", {})


# --- the container command -----------------------------------------------------------------------


def run_script(tmp_path: Path, rjob: dict, env: dict[str, str], rc: int):
    """Runs the container's bash script with a stand-in esmjax that records its argv and
    environment and exits ``rc``; python3 is this interpreter. Returns (exit status, argv, env)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "argv"
    stub = bin_dir / "esmjax"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nenv > {record}.env\nexit {rc}\n')
    stub.chmod(0o755)
    python = bin_dir / "python3"
    python.unlink(missing_ok=True)
    python.symlink_to(sys.executable)
    text = expand(script(rjob), env)
    assert text == script(rjob), "the command must not use $(VAR) of a defined variable"
    full = {**env, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "-c", text], env=full, cwd=ROOT, timeout=60)
    argv = record.read_text().splitlines()
    seen = dict(line.split("=", 1) for line in Path(f"{record}.env").read_text().splitlines())
    return done.returncode, argv, seen


@pytest.mark.parametrize("path", [GPU, TPU], ids=["gpu", "tpu"])
def test_command(tmp_path, path):
    from esmjax.cli import build_parser
    from esmjax.config.train import load_config

    platform = "gpu" if path == GPU else "tpu"
    doc = resized(load(GPU), 2, 2) if path == GPU else load(TPU)
    rjob, *_, env = next(pods(doc))
    for rc in (0, EXIT_PREEMPTED, 1):
        status, argv, seen = run_script(tmp_path, rjob, env, rc)
        assert status == rc  # exec: the container's exit status is esmjax's
    var, flags = xla_flags.flags(platform)
    assert seen[var].split() == flags.split()
    assert argv[0] == "train"
    args = build_parser("train").parse_args(argv)
    assert args.no_progress and args.workdir.startswith("gs://")
    cfg = load_config(ROOT / args.config, args.set)
    assert cfg.data.train.startswith("gs://")
    if platform == "gpu":  # one data-parallel granule per node
        assert cfg.mesh.dcn_data == 4 == int(env["ESMJAX_NUM_PROCESSES"])
        assert seen["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    else:  # one per slice
        assert cfg.mesh.dcn_data == rjob["replicas"]


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext) not installed")
@pytest.mark.parametrize("path", [GPU, TPU], ids=["gpu", "tpu"])
def test_envsubst(path):
    """The README's rendering command gives what these tests read."""
    out = subprocess.run(
        ["envsubst", "${IMAGE}"],
        input=path.read_text(),
        env={"IMAGE": IMAGE, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == render(path)


def strict(schema):
    """The CRD schema with unknown fields refused, as kubectl's strict field validation does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if k != "description" or not isinstance(v, str)}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.mark.skipif(not os.environ.get("ESMJAX_JOBSET_CRD"), reason="ESMJAX_JOBSET_CRD not set")
@pytest.mark.parametrize("path", [GPU, TPU], ids=["gpu", "tpu"])
def test_crd_schema(path):
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(Path(os.environ["ESMJAX_JOBSET_CRD"]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("metadata", None)
    doc = load(path)
    doc.pop("metadata")
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    assert not errors, "\n".join(errors)
