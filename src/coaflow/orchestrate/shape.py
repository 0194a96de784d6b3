"""The shape of a run's graph: how many synthesize shards, which stages launch a TrainJob.

Both engines build their graph before a run exists (KFP at compile time, Airflow when it parses
the DAG), so the shape comes from a profile then: the KFP pipeline's from the profile named when
it is compiled (``python -m components.coaflow_pipeline --profile P``, default ``default``), the
DAG's from its settings' ``profile``. A run whose own config (profile + overrides) asks for
another shape is refused before any work, with the way to fix it (``check``): a graph never
silently runs a different fan-out or placement than the config the stages read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coaflow.errors import UserError

SHARDED = "synthesize"  # the stage an engine fans out over its shards (synthesize.shards)


@dataclass(frozen=True)
class Shape:
    shards: int = 1  # synthesize workers
    launched: dict[str, tuple[int, int]] = field(default_factory=dict)  # stage -> (nodes, gpus)

    @classmethod
    def of(cls, cfg) -> Shape:
        from coaflow.orchestrate.trainjob import LAUNCHED, placement

        section = getattr(cfg, "synthesize", None)
        return cls(shards=int(section.shards) if section is not None else 1,
                   launched={s: p for s in LAUNCHED if (p := placement(cfg, s)) is not None})

    def describe(self) -> str:
        """``synthesize.shards=3, sft on 2x8 GPUs (TrainJob), rl in one pod``"""
        from coaflow.orchestrate.trainjob import LAUNCHED

        parts = [f"synthesize.shards={self.shards}"]
        for s in LAUNCHED:
            parts.append(f"{s} on {self.launched[s][0]}x{self.launched[s][1]} GPUs (TrainJob)"
                         if s in self.launched else f"{s} in one pod")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {"shards": self.shards, "launched": {s: list(p) for s, p in self.launched.items()}}

    @classmethod
    def from_json(cls, d: dict) -> Shape:
        return cls(shards=int(d.get("shards", 1)),
                   launched={s: (int(p[0]), int(p[1])) for s, p in d.get("launched", {}).items()})


def check(built: Shape, cfg, fix: str) -> None:
    """A ``UserError`` when the run's config ``cfg`` asks for another shape than the graph was
    ``built`` with; ``fix`` says how to build the graph for it."""
    wanted = Shape.of(cfg)
    if wanted != built:
        raise UserError(f"this run's config asks for {wanted.describe()}, but the graph was built "
                        f"for {built.describe()}: {fix}")


def of_profile(profile: str, overrides: list[str] | tuple[str, ...] = ()) -> Shape:
    """The shape a profile asks for, read from its YAML alone (no stage module imported: a DAG
    file is parsed again and again and must stay fast); keys it leaves out are 1, their
    defaults. A run validates its whole config and compares with ``check``, so a wrong reading
    here could only refuse a run, never run the wrong shape."""
    from types import SimpleNamespace

    from coaflow.config import read_profile
    from coaflow.contract import ORDER

    data = read_profile(profile, overrides)
    defaults = {"shards": 1, "nodes": 1, "gpus_per_node": 1}
    return Shape.of(SimpleNamespace(**{
        name: SimpleNamespace(**{**defaults, **(data.get(name) or {})}) for name in ORDER}))
