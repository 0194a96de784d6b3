"""The scripted team as a model: its turns, played through the one agent loop.

The ceiling row of an evaluation must play by the rules every student plays by: the same tasks,
the same loop (``agent.run_episodes``: the loop runs the calls with the suite's real tools, an
identical call gets an error, the episode ends at ``max_turns``), the same budget of turns and of
tokens a turn, counted by the student's tokenizer. So the teacher is not scored from its own logs:
for each task the mistake-free scripted team solves it once (``scripted_trajectory``), the
solution is rendered as the student would see it (``models.prompt.to_example``), and
``TeacherBackend`` answers the loop's n-th request for that task with the n-th assistant turn,
token for token as the student would have to generate it (cut at the token budget like any
model's turn), in the style of the team whose runs the student trained on (``terse`` or not). A budget the teacher's own solutions do not fit shows as a ceiling below 100 %.
"""

from __future__ import annotations

import random

from coaflow.agent.loop import Completion
from coaflow.schema import Outcome, Provenance, Task, Trajectory


def scripted_trajectory(task: Task, seed: int, terse: bool = False) -> Trajectory:
    """The mistake-free scripted team's run of ``task`` (``terse``: in its terse style),
    distilled to a trajectory."""
    from coaflow.envs.rewards import score
    from coaflow.teachers import scripted
    from coaflow.teachers.log import distill, team_log

    log = team_log(task, seed)
    try:
        answer = scripted.solve(task, log, random.Random(f"{seed}-{task.task_id}"),
                                scripted.Mistakes(0.0, 0.0), terse)
    except ValueError:
        answer = None
    reward = score(task.suite, answer, task.answer)
    return distill(log, f"{task.task_id}-teacher", answer,
                   Provenance(teacher="scripted", model=scripted.team_name(terse), seed=seed),
                   Outcome(final_answer=answer, reward=reward, correct=reward == 1.0))


class TeacherBackend:
    """The agent loop's backend protocol over the scripted team's solutions of ``tasks``: the
    n-th request of an episode gets the team's n-th assistant turn, as the tokens of
    ``tokenizer`` (the student's) render it."""

    asynchronous = False

    def __init__(self, tasks: list[Task], tokenizer, seed: int = 0, terse: bool = False):
        from coaflow.teachers.scripted import team_name

        self.tasks = {t.question: t for t in tasks}
        self.tok, self.seed, self.terse = tokenizer, seed, terse
        self.name = team_name(terse)
        self.turns: dict[str, list[list[int]]] = {}  # question -> each turn's token ids

    def _turns(self, question: str) -> list[list[int]]:
        if question not in self.turns:
            from coaflow.agent.budget import turn_token_ids
            from coaflow.models.prompt import to_example

            example = to_example(scripted_trajectory(self.tasks[question], self.seed,
                                                     self.terse))
            self.turns[question] = turn_token_ids(example, self.tok)
        return self.turns[question]

    def generate(self, prompts: list[list[dict]], tools=None, *, max_new_tokens: int | list[int],
                 temperature: float = 0.0, seed: int = 0) -> list[Completion]:
        from coaflow.models.prompt import stop_token_ids

        limits = (max_new_tokens if isinstance(max_new_tokens, list)
                  else [max_new_tokens] * len(prompts))
        stops = set(stop_token_ids(self.tok))
        out = []
        for messages, limit in zip(prompts, limits, strict=True):
            question = next(m["content"] for m in messages if m["role"] == "user")
            turns = self._turns(question)
            n = sum(m["role"] == "assistant" for m in messages)
            if n >= len(turns):  # the team has said everything: a turn with nothing in it
                out.append(Completion("", 0))
                continue
            tokens = turns[n]
            kept = tokens[:limit]
            text = self.tok.decode([t for t in kept if t not in stops], skip_special_tokens=False)
            out.append(Completion(text, len(kept), "stop" if len(tokens) <= limit else "length"))
        return out
