"""Every subcommand given bad input: one line naming what is wrong, the exit code of
``coaflow.errors`` for it, no traceback, nothing half-written. And the real-world files that are
not bad at all (a byte-order mark, a pretty-printed JSON array, a stage folder) are read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from coaflow.cli import main
from coaflow.contract import ORDER, load_stage
from coaflow.errors import EXIT_OK, EXIT_RETRY, EXIT_USER
from coaflow.schema import write_jsonl
from tests.conftest import make_trajectory

DEEP = "[" * 10_000 + "]" * 10_000


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """bad.jsonl (not JSON), deep.jsonl (10,000 levels), deep300.jsonl (a trajectory with 300
    levels in its details), good.jsonl (3 trajectories),
    bom.jsonl (the same behind a UTF-8 BOM), array.jsonl (the same, a pretty-printed array)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "bad.jsonl").write_text("garbage\n")
    (d / "deep.jsonl").write_text(DEEP + "\n")
    trajs = [make_trajectory(i) for i in range(3)]
    nested: list = []
    for _ in range(300):  # parses, but past what pydantic can serialize again
        nested = [nested]
    record = {**trajs[0].model_dump(mode="json"), "details": {"x": nested}}
    write_jsonl(d / "deep300.jsonl", [record])
    write_jsonl(d / "good.jsonl", trajs)
    os.mkfifo(d / "fifo")  # a special file, as /dev/full is: an output must not replace it
    (d / "latin1.yaml").write_bytes(b"run:\n  name: caf\xe9\n")
    (d / "base5.yaml").write_text("base: 5\n")
    (d / "baselist.yaml").write_text("base: [a]\n")
    (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (d / "good.jsonl").read_bytes())
    (d / "array.jsonl").write_text(json.dumps([t.model_dump(mode="json") for t in trajs],
                                              indent=2))
    return d


def invoke(*args, cwd: Path | None = None):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert not isinstance(res.exception, RecursionError)
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        f"traceback for {args}: {res.exception!r}"
    assert "Traceback" not in res.output
    return res


def assert_one_error_line(res, *words: str) -> None:
    usage = ("Usage: ", "Try '")  # click's usage errors add these two lines above the error
    errors = [line for line in res.stderr.splitlines() if line and not line.startswith(usage)]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])


def leftovers(folder: Path) -> list[str]:
    """Half-written output: ``*.tmp`` files and ``*.partial`` folders anywhere under ``folder``."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")))


# (arguments, exit code, words the error line must hold); {d} is the inputs folder, {o} a fresh
# output folder that must not be created.
CASES = [
    (["synthesize", "--suite", "web", "-n", "2", "--output", "{o}"], EXIT_USER, ["'web'", "kbqa"]),
    (["synthesize", "--teacher", "llm", "-n", "1", "--output", "{o}", "--set",
      "synthesize.llm.base_url=http://127.0.0.1:9/v1"], EXIT_RETRY, ["127.0.0.1:9", "reach"]),
    (["synthesize", "--set", "synthesize.split=dev", "--workdir", "{o}"], EXIT_USER,
     ["synthesize.split", "dev"]),
    (["synthesize", "--set", "synthesize.suites.kbqa=-5", "--workdir", "{o}"], EXIT_USER,
     ["kbqa", "-5"]),
    (["run", "--set", "run.name=", "--workdir", "{o}"], EXIT_USER, ["run.name"]),
    (["run", "--set", "run.workdir="], EXIT_USER, ["run.workdir"]),
    (["sft", "--set", "sft.lr=.inf", "--workdir", "{o}"], EXIT_USER, ["sft.lr", "finite"]),
    (["sft", "--set", "sft.max_steps=-7", "--workdir", "{o}"], EXIT_USER, ["sft.max_steps", "-7"]),
    (["config", "--profile", "nosuch"], EXIT_USER, ["'nosuch'"]),
    (["config", "--set", "sft.nokey=1"], EXIT_USER, ["sft.nokey"]),
    (["run", "--only", "nosuch", "--workdir", "{o}"], EXIT_USER, ["'nosuch'"]),
    (["run", "--from", "nosuch", "--workdir", "{o}"], EXIT_USER, ["'nosuch'"]),
    (["gate", "--input", "{d}/missing", "--output", "{o}"], EXIT_USER, ["missing"]),
    (["stage", "nosuch", "--out", "{o}"], EXIT_USER, ["'nosuch'"]),
    (["stage", "gate", "--out", "{o}", "--input", "synthesize={d}/missing"], EXIT_USER,
     ["synthesize=", "missing"]),
    (["stage", "gate", "--out", "{o}", "--input", "bogus"], EXIT_USER, ["'bogus'", "STAGE=DIR"]),
    (["runs", "show", "nope", "--workdir", "{o}"], EXIT_USER, ["'nope'"]),
    (["runs", "report", "nope", "--workdir", "{o}"], EXIT_USER, ["'nope'"]),
    (["data", "stats", "{d}/bad.jsonl"], EXIT_USER, ["bad.jsonl:1:", "invalid JSON"]),
    (["data", "stats", "{d}/deep.jsonl"], EXIT_USER, ["deep.jsonl:1:", "levels deep"]),
    (["data", "validate", "{d}/deep.jsonl"], EXIT_USER, ["deep.jsonl:1:", "levels deep"]),
    (["data", "convert", "--from", "coaflow", "--to", "coaflow", "{d}/deep300.jsonl",
      "{o}/out.jsonl"], EXIT_USER, ["deep300.jsonl:1:", "more than 200 levels deep"]),
    (["data", "convert", "--from", "adp", "--to", "coaflow", "{d}/deep.jsonl", "{o}/out.jsonl"],
     EXIT_USER, ["deep.jsonl:1:", "levels deep"]),
    (["data", "convert", "--from", "coaflow", "--to", "adp", "{d}/bad.jsonl", "{o}/out.json"],
     EXIT_USER, ["bad.jsonl:1:"]),
    # issue 22: a device or a folder as OUT is refused, never replaced by a file
    (["data", "convert", "--from", "coaflow", "--to", "coaflow", "{d}/good.jsonl", "{d}/fifo"],
     EXIT_USER, ["fifo", "not a regular file"]),
    (["data", "convert", "--from", "coaflow", "--to", "coaflow", "{d}/good.jsonl", "{d}"],
     EXIT_USER, ["a folder"]),
    (["config", "--profile", "{d}"], EXIT_USER, ["a folder"]),
    (["config", "--profile", "{d}/latin1.yaml"], EXIT_USER, ["latin1.yaml", "not UTF-8"]),
    (["config", "--profile", "{d}/base5.yaml"], EXIT_USER, ["base5.yaml", "base", "5"]),
    (["config", "--profile", "{d}/baselist.yaml"], EXIT_USER, ["baselist.yaml", "base"]),
    (["config", "--set", f"run.seed={10**26}"], EXIT_USER, ["run.seed"]),
    (["config", "--set", f"sft.max_steps={10**29}"], EXIT_USER, ["sft.max_steps", "range"]),
    (["config", "--set", f"synthesize.suites={{kbqa: {10**14}}}"], EXIT_USER,
     ["synthesize.suites", "range"]),
    (["run", "--run-id", "../../x", "--workdir", "{o}"], EXIT_USER, ["--run-id", "../../x"]),
    (["run", "--run-id", "{o}/abs", "--workdir", "{o}"], EXIT_USER, ["--run-id"]),
    (["runs", "show", "../..", "--workdir", "{o}"], EXIT_USER, ["--run-id"]),
    (["models", "list", "--workdir", "{o}"], EXIT_USER, ["no registry", "mlflow.db"]),
    (["models", "rollback", "m", "--reason", " ", "--workdir", "{o}"], EXIT_USER, ["--reason"]),
    (["env", "sample", "web"], EXIT_USER, ["'web'"]),
    (["env", "call", "calc", "nosuch"], EXIT_USER, ["'nosuch'", "python"]),
    (["env", "call", "calc", "python", "--args", "{bad"], EXIT_USER, ["--args", "line 1 column 2"]),
    (["env", "call", "calc", "python", "--args", "@{d}/missing.py"], EXIT_USER, ["missing.py"]),
]


# every stage that exists, run without the stages it needs: one line naming the missing input
for _name in ORDER:
    _needs = load_stage(_name).NEEDS
    CASES.append(([_name, "--set", f"{_name}.nosuch=1", "--workdir", "{o}"], EXIT_USER,
                  [f"{_name}.nosuch", "unknown key"]))
    if _needs:
        CASES.append(([_name, "--workdir", "{o}"], EXIT_USER, [f"needs {_needs[0]}"]))
        CASES.append((["stage", _name, "--out", "{o}"], EXIT_USER, [f"--input {_needs[0]}="]))


@pytest.mark.parametrize("args,code,words", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_input_is_one_line_with_its_exit_code(files, tmp_path, monkeypatch, args, code, words):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    res = invoke(*[a.replace("{d}", str(files)).replace("{o}", str(out)) for a in args])
    assert res.exit_code == code, res.output
    assert_one_error_line(res, *words)
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing in the current folder
    assert leftovers(files) == []


@pytest.mark.parametrize("name", ["deep.jsonl", "deep300.jsonl"])
def test_gate_quarantines_a_deeply_nested_line_and_leaves_no_partial_output(files, tmp_path, name):
    out = tmp_path / "gated"
    res = invoke("gate", "--input", files / name, "--output", out,
                 "--set", "gate.expectations=false", "--set", "gate.min_accepted_fraction=0")
    assert res.exit_code == EXIT_OK, res.output
    [q] = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert q["line"] == 1 and "levels deep" in q["details"][0]
    assert leftovers(out) == [] and (out / "accepted").is_dir()


@pytest.mark.parametrize("name", ["good.jsonl", "bom.jsonl", "array.jsonl"])
def test_a_bom_or_a_pretty_printed_array_is_read_in_full(files, tmp_path, name):
    res = invoke("data", "validate", files / name)
    assert res.exit_code == 0 and "3 valid, 0 invalid" in res.output
    stats = json.loads(invoke("data", "stats", files / name).output)
    assert stats["trajectories"] == 3
    out = tmp_path / "gated"
    res = invoke("gate", "--input", files / name, "--output", out, "--set",
                 "gate.expectations=false")
    assert res.exit_code == 0, res.output
    quarantined = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert not [q for q in quarantined if q["reasons"][0] in ("invalid_json", "unreadable")]


def test_a_bad_element_of_an_array_is_named_by_its_line(tmp_path):
    good = make_trajectory(0).model_dump(mode="json")
    text = json.dumps([good, {"id": "x"}], indent=2)
    (tmp_path / "a.json").write_text(text)
    starts = [i + 1 for i, s in enumerate(text.splitlines()) if s == "  {"]  # element openings
    res = invoke("data", "validate", tmp_path / "a.json")
    assert res.exit_code == EXIT_USER and "1 valid, 1 invalid" in res.output
    assert len(starts) == 2 and f"a.json:{starts[1]}: task" in res.stderr


def test_data_stats_on_a_synthesize_folder_reads_its_trajectories(tmp_path):
    out = tmp_path / "syn"
    res = invoke("synthesize", "--suite", "kbqa", "-n", "3", "--output", out,
                 "--workdir", tmp_path / "w")
    assert res.exit_code == 0, res.output
    assert (out / "raw").is_dir() and (out / "trajectories").is_dir()
    stats = json.loads(invoke("data", "stats", out).output)
    assert stats["trajectories"] == 3 and stats["suite"] == {"kbqa": 3}
    assert "3 valid, 0 invalid" in invoke("data", "validate", out).output
    gated = tmp_path / "gated"  # and a gate folder: its accepted shards, not the quarantine
    invoke("gate", "--input", out, "--output", gated, "--set", "gate.expectations=false")
    (gated / "quarantine.jsonl").write_text('{"not": "a trajectory"}\n')
    accepted = json.loads(invoke("data", "stats", gated).output)["trajectories"]
    report = json.loads((gated / "gate_report.json").read_text())
    assert report["input"] == str(out) and accepted == report["accepted"] > 0


# --- the torchrun launcher: every rank checks its input, one line and exit 2 --------------------

# (arguments of ``python -m coaflow.launch``, environment, words); rank 1 unless RANK is given.
# Rank 0 is ``coaflow stage`` itself (the CASES above); a worker used to raise a traceback (exit
# 1) that torchrun reported as the root cause, and the orchestrator saw a bug, not bad input.
LAUNCH_CASES = [
    (["stage", "sft", "--config", "nosuch", "--out", "{o}"], {}, ["'nosuch'"]),
    (["stage", "sft", "--out", "{o}", "--input", "gate={d}/missing"], {}, ["gate=", "missing"]),
    (["stage", "nosuch", "--out", "{o}"], {}, ["'nosuch'"]),
    (["stage", "sft", "--out", "{o}"], {}, ["--input gate="]),
    (["stage", "sft", "--out", "{o}", "--input", "bogus"], {}, ["'bogus'", "STAGE=DIR"]),
    (["stage", "sft", "--input", "gate={d}"], {}, ["--out"]),
    (["stage", "sft", "--out", "{o}", "--set", "sft.lr=.inf"], {}, ["sft.lr", "finite"]),
    (["stage", "sft", "--out", "{o}"], {"RANK": "abc"}, ["RANK", "'abc'"]),
    (["stage", "sft", "--out", "{o}"], {"RANK": "0x1"}, ["RANK", "'0x1'"]),
]


@pytest.mark.parametrize("args,env,words", LAUNCH_CASES,
                         ids=[" ".join(c[0][:4]) + str(c[1]) for c in LAUNCH_CASES])
def test_bad_input_on_a_torchrun_rank_is_one_line_and_2(files, tmp_path, monkeypatch, capsys,
                                                        args, env, words):
    from coaflow import launch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in {"RANK": "1", **env}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    try:
        code = launch.main([a.replace("{d}", str(files)).replace("{o}", str(out)) for a in args])
    except Exception as e:  # noqa: BLE001 - what this test is about
        pytest.fail(f"traceback for {args}: {e!r}")
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert code == EXIT_USER, err
    assert len(err) == 1 and err[0].startswith("Error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not out.exists() and sorted(tmp_path.iterdir()) == []


# --- the TrainJob launch step: checked before anything is copied or submitted ------------------

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: not-a-secret}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""
# (launcher options, stage options, kubeconfig, exit code, words); {k}: the settings as JSON
# (the volume at {m}), {g}: a completed gate folder outside the volume (a KFP artifact)
TRAINJOB_CASES = [
    (["--nodes", "0"], [], "none", EXIT_USER, ["nodes", ">= 1"]),
    (["--nodes", "x"], [], "none", EXIT_USER, ["--nodes", "'x'"]),
    (["--k8s-json", "{bad"], [], "none", EXIT_USER, ["--k8s-json", "not JSON"]),
    (["--k8s-json", '{"namespace": 5}'], [], "none", EXIT_USER, ["--k8s-json", "namespace"]),
    ([], [], "none", EXIT_USER, ["kubeconfig"]),
    ([], [], "unreachable", EXIT_RETRY, ["https://127.0.0.1:1", "did not answer"]),
    ([], ["--input", "gate"], "none", EXIT_USER, ["--input 'gate'", "STAGE=DIR"]),
    ([], ["--input", "gate={m}/missing"], "unreachable", EXIT_USER, ["gate=", "missing"]),
    ([], ["--bogus"], "none", EXIT_USER, ["--bogus"]),
]


@pytest.mark.parametrize("opts,stage,kube,code,words", TRAINJOB_CASES,
                         ids=[" ".join(c[0] + c[1])[:30] or c[2] for c in TRAINJOB_CASES])
def test_bad_input_to_the_trainjob_launch_step_is_one_line(tmp_path, monkeypatch, capsys, opts,
                                                           stage, kube, code, words):
    from coaflow.orchestrate import k8s, trainjob

    mount, gate = tmp_path / "pvc", tmp_path / "pod" / "gate"
    gate.mkdir(parents=True)
    (gate / "result.json").write_text("{}")
    (gate / ".complete").write_text("key")
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / ("kubeconfig" if kube == "unreachable"
                                                       else "no-such-kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    settings = k8s.load().model_copy(update={"mount_path": str(mount)}).model_dump_json()
    fill = {"{k}": settings, "{m}": str(mount), "{g}": str(gate)}

    def sub(a: str) -> str:
        for k, v in fill.items():
            a = a.replace(k, v)
        return a

    argv = [*map(sub, (["--nodes", "2", "--gpus-per-node", "1", "--k8s-json", "{k}"]
                       if not any(o.startswith("--nodes") for o in opts) else
                       ["--gpus-per-node", "1", "--k8s-json", "{k}"]) + opts), "--",
            "coaflow", "stage", "sft", "--out", str(tmp_path / "pod" / "sft"),
            *map(sub, stage or ["--input", "gate={g}"])]
    if "--k8s-json" in opts:  # the case's own settings replace the good ones
        i = argv.index("--k8s-json")
        del argv[i:i + 2]
    try:
        rc = trainjob.main(argv)
    except Exception as e:  # noqa: BLE001 - what this test is about
        pytest.fail(f"traceback for {opts + stage}: {e!r}")
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert rc == code, err
    assert len(err) == 1 and err[0].startswith("Error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not mount.exists()  # nothing copied onto the volume
    assert not (tmp_path / "pod" / "sft").exists()
