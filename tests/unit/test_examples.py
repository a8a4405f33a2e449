"""The cluster examples work as written: the SLURM script's finalize line runs under dash (what `sbatch
--wrap` uses on Debian/Ubuntu), its array follows NUM_SHARDS, and the Kubernetes manifest is valid
against the batch/v1 and core/v1 schemas (the `kubernetes` client's models) with the steps it promises."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from e2e_helpers import REPO

from storage import load_manifest
from storage.synthetic import synthetic_spec, write_synthetic_run

SBATCH = REPO / "examples" / "slurm_teacher.sbatch"
K8S = REPO / "examples" / "k8s_teacher_job.yaml"
DASH = shutil.which("dash")


def _fake_sbatch(tmp_path: Path) -> Path:
    """An `sbatch` on PATH that records its arguments (one line per call) and answers a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do printf "%s\\n" "$a"; done >> "$SBATCH_LOG"\n'
        'echo ---- >> "$SBATCH_LOG"\n'
        "echo 4242\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _submit(tmp_path: Path, **env) -> list[list[str]]:
    log = tmp_path / "sbatch.log"
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(PATH=f"{_fake_sbatch(tmp_path)}:{os.environ['PATH']}", SBATCH_LOG=str(log), **env)
    r = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().split("----\n")
    return [c.splitlines() for c in calls if c.strip()]


@pytest.mark.parametrize("n", [7, 64])
def test_sbatch_array_size_follows_num_shards(tmp_path, n):
    array, finalize = _submit(tmp_path, NUM_SHARDS=str(n), RUN=str(tmp_path / "run"))
    assert f"--array=0-{n - 1}" in array and array[-1] == str(SBATCH)
    assert "--dependency=afterany:4242" in finalize
    assert not any(line.startswith("#SBATCH --array") for line in SBATCH.read_text().splitlines()), (
        "a fixed #SBATCH --array would override nothing and disagree with NUM_SHARDS"
    )


@pytest.mark.skipif(DASH is None, reason="dash is not installed")
def test_sbatch_finalize_line_runs_under_dash(tmp_path):
    """The exact --wrap line, run by dash, finalizes a real run directory (a path with a space, too)."""
    run = tmp_path / "runs dir" / "r1"
    write_synthetic_run(run, synthetic_spec(num_shards=2, num_sequences=6), finalize=False)
    env = {**os.environ, "LA_VENV": str(Path(REPO / ".venv").resolve()), "RUN": str(run), "PYTHONPATH": str(REPO)}
    (_, finalize) = _submit(tmp_path, LA_VENV=env["LA_VENV"], RUN=str(run))
    line = finalize[finalize.index("--wrap") + 1]
    assert subprocess.run([DASH, "-n", "-c", line]).returncode == 0, "dash parses it"
    assert "source" not in line.split() and not line.startswith(".")
    printed = subprocess.run(["bash", str(SBATCH), "--print-finalize"], env=env, capture_output=True, text=True)
    assert printed.stdout == line
    r = subprocess.run([DASH, "-c", line], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert load_manifest(run).rows == 6


def test_sbatch_task_beyond_num_shards_is_refused(tmp_path):
    e = {**os.environ, "SLURM_JOB_ID": "1", "SLURM_ARRAY_TASK_ID": "9", "NUM_SHARDS": "4", "LA_VENV": "/nonexistent"}
    r = subprocess.run(["bash", str(SBATCH)], env=e, capture_output=True, text=True)
    assert r.returncode == 2 and "--array=0-3" in r.stderr


# --------------------------------------------------------------------------------------------- Kubernetes


def _strict(model_cls, data, where: str, problems: list[str]) -> None:
    """Every key of `data` is a field of the model (the client's deserializer ignores unknown keys)."""
    import kubernetes.client as k

    if not isinstance(data, dict):
        return
    by_json = {v: f for f, v in model_cls.attribute_map.items()}
    for key, value in data.items():
        if key not in by_json:
            problems.append(f"{where}.{key}: not a field of {model_cls.__name__}")
            continue
        typ = model_cls.openapi_types[by_json[key]]
        is_list = typ.lower().startswith("list[")
        cls = getattr(k, typ[len("list[") : -1] if is_list else typ, None)
        if cls is None:  # a scalar, or a map of scalars
            continue
        for j, item in enumerate(value if is_list else [value]):
            _strict(cls, item, f"{where}.{key}" + (f"[{j}]" if is_list else ""), problems)


def _docs():
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def test_k8s_manifest_is_valid_against_the_schemas():
    k8s = pytest.importorskip("kubernetes", reason="the kubernetes client validates the manifest (dev extra)")
    api = k8s.client.ApiClient()
    problems: list[str] = []
    for doc in _docs():
        cls_name = {"Job": "V1Job", "PersistentVolumeClaim": "V1PersistentVolumeClaim"}[doc["kind"]]
        _strict(getattr(k8s.client, cls_name), doc, doc["metadata"]["name"], problems)
        # Typed deserialization: required fields, enums and types are checked by the models' setters.
        api._ApiClient__deserialize(doc, cls_name)
    assert problems == []


def test_the_schema_check_catches_a_misspelt_field():
    k8s = pytest.importorskip("kubernetes", reason="the kubernetes client validates the manifest (dev extra)")
    job = next(d for d in _docs() if d["metadata"]["name"] == "la-teacher")
    job["spec"]["podFailurePolicy"]["rules"][0]["onPodCondition"] = [{"type": "DisruptionTarget"}]
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    problems: list[str] = []
    _strict(k8s.client.V1Job, job, "la-teacher", problems)
    assert problems == [
        "la-teacher.spec.podFailurePolicy.rules[0].onPodCondition: not a field of V1PodFailurePolicyRule",
        "la-teacher.spec.template.spec.containers[0].volumeMount: not a field of V1Container",
    ]


def test_k8s_manifest_has_the_steps_it_promises():
    docs = {d["metadata"]["labels"]["step"]: d for d in _docs()}
    assert list(docs) == ["storage", "stage", "teacher", "finalize"]
    pvc = docs["storage"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"].get("storageClassName")
    job = docs["teacher"]["spec"]
    args = docs["teacher"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--num-shards={job['completions']}" in args and job["completionMode"] == "Indexed"
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in job["podFailurePolicy"]["rules"]
    assert job["podReplacementPolicy"] == "Failed" and job["template"]["spec"]["restartPolicy"] == "Never"
    fin = docs["finalize"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert fin[:3] == ["pipeline", "teacher", "--finalize"] and fin[3] in " ".join(args)
    staged = docs["stage"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for path in ("/data/models/teacher", "/data/corpus"):
        assert path in staged and any(a.endswith("=" + path) for a in args), path
    for d in docs.values():
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in d["spec"].get("template", {}).get("spec", {}).get("volumes", [])
        ]
        assert claims in ([], [pvc["metadata"]["name"]])
