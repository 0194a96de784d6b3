"""gate: keep only good trajectories, quarantine the rest, stop the run on a bad batch.

\b
    coaflow gate                                     # on the synthesize output of a new run
    coaflow run --run-id RUN --from gate             # after a synthesize of run RUN
    coaflow gate --input data/ --output gated/       # standalone, on any trajectory file/folder

Per trajectory: schema, tool call/observation links, role tags in order (think or plan before
acting, one answer, nothing after it), tool names and arguments valid for the suite, an answer,
length (in tokens of the SFT tokenizer when ``gate.tokenizer`` is set); then correctness against
the reference (the suite's verifier), tool-use sanity, exact and MinHash near-duplicates, and
decontamination against the test split. Per batch: a Great Expectations suite over the table of
trajectories (accepted fraction, duplicate fraction, rows per suite, turn/tool-call/length
bounds); any failed expectation fails the stage and names itself.

Writes into the stage folder: ``accepted/`` (shards), ``quarantine.jsonl`` (one record per
rejected trajectory or unreadable line: source file, line, id, reasons), ``data_docs/`` (GX Data
Docs HTML) and ``gate_report.json``; all of them are logged to MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from coaflow.section import Section

if TYPE_CHECKING:
    from coaflow.contract import Context, Result

NAME = "gate"
NEEDS = ("synthesize",)
RESUMABLE = False
PATH_FIELDS = ("tokenizer", "decontam_file")  # local files/folders: their contents are in the cache key


class Config(Section):
    # --- per trajectory: structure
    max_chars: int = Field(100_000, gt=0, description="reject a trajectory with more characters "
                           "of text (question, messages, calls, observations)")
    tokenizer: str | None = Field(None, description="folder of the SFT tokenizer (AutoTokenizer, "
                                  "with a chat template); null: no token-length check")
    max_tokens: int = Field(4096, gt=0, description="with a tokenizer: maximum tokens of the "
                            "rendered chat (the SFT max length)")
    # --- per trajectory: content
    correctness: Literal["correct", "correct_or_recovered", "off"] = Field(
        "correct", description="keep runs whose answer the suite's verifier accepts; "
        "correct_or_recovered also keeps runs with outcome.recovered; off: no check")
    max_identical_calls: int = Field(2, ge=1, description="longest allowed run of identical "
                                     "consecutive tool calls (same tool, same arguments)")
    allow_empty_observations: bool = Field(False, description="keep runs with an empty tool "
                                           "output")
    dedup: bool = Field(True, description="drop exact duplicates (normalized text hash)")
    near_duplicates: bool = Field(True, description="also drop near duplicates (MinHash LSH)")
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1, description="Jaccard similarity of "
                                            "word shingles above which two runs are the same")
    minhash_perm: int = Field(64, ge=16, description="MinHash permutations (accuracy vs speed)")
    shingle: int = Field(5, ge=1, description="words per shingle for near-duplicate MinHash")
    decontam_test_tasks: int = Field(200, ge=0, description="test-split tasks per suite "
                                     "(envs.make_tasks(suite, 'test', n, run.seed)) to "
                                     "decontaminate against; 0: none")
    decontam_file: str | None = Field(None, description="JSONL of test questions ({'question': "
                                      "...}) to decontaminate against as well")
    decontam_ngram: int = Field(8, ge=1, description="words per n-gram for the overlap test")
    decontam_threshold: float = Field(0.8, gt=0, le=1, description="reject a question when this "
                                      "fraction of its n-grams occur in one test question")
    # --- per batch: Great Expectations
    expectations: bool = Field(True, description="run the GX suite (off: per-record checks only)")
    data_docs: bool = Field(True, description="write GX Data Docs HTML into the stage folder")
    min_accepted_fraction: float = Field(0.5, ge=0, le=1, description="fail when fewer of the "
                                         "input records are accepted")
    max_duplicate_fraction: float = Field(0.2, ge=0, le=1, description="fail when more of the "
                                          "input records are (near) duplicates")
    min_rows_per_suite: int = Field(1, ge=0, description="fail when a suite keeps fewer rows")
    min_suite_accepted_fraction: float = Field(0.0, ge=0, le=1, description="fail when a suite "
                                               "keeps a smaller fraction of its rows")
    required_suites: list[str] = Field(default_factory=list, description="suites that must be "
                                       "present in the input")
    min_turns: int = Field(1, ge=0, description="accepted runs: fewest assistant turns")
    max_turns: int = Field(64, ge=1, description="accepted runs: most assistant turns")
    min_tool_calls: int = Field(0, ge=0, description="accepted runs: fewest tool calls")
    max_tool_calls: int = Field(32, ge=0, description="accepted runs: most tool calls")
    min_chars: int = Field(20, ge=0, description="accepted runs: fewest characters of text")
    min_mean_tool_calls: float = Field(0.5, ge=0, description="accepted runs: least mean tool "
                                       "calls per run (a teacher that stopped using tools)")
    bounds_mostly: float = Field(1.0, gt=0, le=1, description="fraction of accepted runs that "
                                 "must be within the turn/tool-call/char bounds")
    shard_size: int = Field(10_000, ge=1, description="trajectories per accepted shard")
    workers: int = Field(1, ge=1, description="processes that parse and check shards in "
                         "parallel (one shard each; >1 costs ~2 s to start)")


def gate_folder(cfg: Config, input_path, out_dir, seed: int = 0, log=print) -> dict:
    """The one core both entry points share."""
    from coaflow.gates.core import gate

    return gate(input_path, out_dir, cfg, seed=seed, log=log)  # GateError / DataError: exit 2,
    # GateRefusedError (a failed expectation): exit 3


def gate_result(report: dict, out) -> Result:
    from coaflow.contract import Result

    metrics = {"in": report["in"], "accepted": report["accepted"],
               "rejected": report["rejected"],
               "accepted_fraction": round(report["accepted_fraction"], 4)}
    metrics.update({f"rejected_{k}": v for k, v in report["reasons"].items()})
    summary = {"suites": report["suites"], "reasons": report["reasons"],
               "skipped_files": report["skipped_files"][:20],
               "expectations": {r["name"]: r["success"] for r in report["expectations"]},
               "timings": report["timings"]}
    return Result(data="accepted",
                  outputs={"accepted": report["accepted_dir"], "quarantine": report["quarantine"],
                           "data_docs": str(out / "data_docs"),
                           "report": str(out / "gate_report.json")},
                  metrics=metrics, summary=summary)


def run(cfg: Config, ctx: Context) -> Result:
    source = ctx.input("synthesize").paths("trajectories")  # several: synthesize in shards
    source = source[0] if len(source) == 1 else source
    try:
        report = gate_folder(cfg, source, ctx.out, seed=ctx.run.seed)
    finally:  # a failed batch's quarantine and Data Docs are what the user needs to look at
        for name in ("quarantine.jsonl", "gate_report.json", "data_docs"):
            ctx.tracker.log_artifact(ctx.out / name, None if name != "data_docs" else "data_docs")
    result = gate_result(report, ctx.out)
    ctx.tracker.log_metrics({f"suite.{s}.{k}": v for s, c in report["suites"].items()
                             for k, v in c.items() if k in ("in", "accepted")})
    return result
