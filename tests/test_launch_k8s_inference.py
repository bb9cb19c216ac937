"""launch/k8s_job_inference.yaml, rendered as its header says: an Indexed Job whose pods are the
processes of an inference job (``esmjax.inference.units``), each finding its share from what
Kubernetes gives it, with preemption retried without using up an index's retries."""

import pytest
import yaml
from test_launch_k8s import POD_ACTIONS, ROOT, esmjax_container, pod_failure_action, render
from test_launch_k8s import run_script as run_container

from esmjax.inference import units
from esmjax.train.preemption import EXIT_PREEMPTED

PATH = ROOT / "launch" / "k8s_job_inference.yaml"


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(render(PATH))


def as_rjob(job: dict) -> dict:
    """The shape test_launch_k8s's helpers read (a JobSet's replicatedJob: template = Job)."""
    return {"template": {"spec": job["spec"]}}


def pod_env(job: dict, index: int) -> dict[str, str]:
    """The container's env and JOB_COMPLETION_INDEX, which Kubernetes adds to an Indexed pod."""
    env = {v["name"]: v["value"] for v in esmjax_container(as_rjob(job))["env"]}
    return {**env, "JOB_COMPLETION_INDEX": str(index)}


def test_fields(job):
    assert f"envsubst '${{IMAGE}}' < launch/{PATH.name}" in PATH.read_text()
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert (
        spec["completionMode"] == "Indexed" and spec["template"]["spec"]["restartPolicy"] == "Never"
    )
    n = int(pod_env(job, 0)["ESMJAX_NUM_PROCESSES"])
    assert spec["completions"] == spec["parallelism"] == n
    assert spec["backoffLimitPerIndex"] >= 1 and "backoffLimit" not in spec
    assert all(r["action"] in POD_ACTIONS for r in spec["podFailurePolicy"]["rules"])


def test_each_pod_takes_its_own_units(job):
    n = job["spec"]["completions"]
    workers = [units.worker(pod_env(job, i)) for i in range(n)]
    assert [(w.index, w.count) for w in workers] == [(i, n) for i in range(n)]
    for unit in range(3 * n):  # every unit taken by exactly one pod
        assert sum(w.takes(unit) for w in workers) == 1


def test_failures(job):
    spec = job["spec"]
    assert pod_failure_action(spec, "esmjax", EXIT_PREEMPTED) == "Ignore"
    assert pod_failure_action(spec, "esmjax", 137, [("DisruptionTarget", "True")]) == "Ignore"
    assert pod_failure_action(spec, "esmjax", 2) == "FailIndex"
    for error in (1, 137, 139):  # a traceback, the OOM killer, a crash: retried per index
        assert pod_failure_action(spec, "esmjax", error) == "Count"


def test_command(tmp_path, job):
    from esmjax.cli import build_parser

    for rc in (0, EXIT_PREEMPTED, 1):
        status, argv, seen = run_container(tmp_path, as_rjob(job), pod_env(job, 1), rc)
        assert status == rc  # exec: the pod's exit status is esmjax's
    assert seen["JOB_COMPLETION_INDEX"] == "1"
    args = build_parser("embed").parse_args(argv)
    assert args.command == "embed" and args.no_progress and args.format == "shards"
    assert args.out.startswith("gs://") and all(f.startswith("gs://") for f in args.fasta)
    assert args.process_id is None  # from the environment (units.worker)
