"""The tools and the TRL environment classes of the built-in suites.

One class per suite, in the shape ``trl.GRPOTrainer(environment_factory=...)`` expects (checked
against TRL 1.16's ``grpo_trainer``): every public method except ``reset`` and ``get_reward`` is
a tool (TRL lists them with ``inspect.getmembers(type(env), inspect.isfunction)`` and builds the
schema with ``transformers.utils.get_json_schema``, so each has type hints and a Google-style
docstring with an ``Args:`` section); ``reset(**row)`` gets the dataset row and returns None (the
question is already in the prompt); ``get_reward()`` scores the episode. Anything else on the
classes is private (underscore) so it never leaks into the tool list.

TRL's environments never see the model's text, only its tool calls, so the final ``<answer>``
reaches ``get_reward`` through ``answer_reward``: a plain reward function (pass it in
``reward_funcs``; TRL runs reward functions in order, before the environments' ``get_reward``)
that scores each completion and records its answer on the environment. Give one of the two a
zero weight, or pass only ``answer_reward`` - both compute the same score.

The agent loop of coaflow calls the same methods (``call_tool``), so a tool behaves the same in
synthesis, RL and evaluation.
"""

from __future__ import annotations

import difflib
import functools
import re

from coaflow.envs import kbqa, rewards
from coaflow.envs.sandbox import format_observation, run_python

# --- kbqa tools -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def search_index(world_seed: int, n_entities: int):
    """(titles, bm25s retriever, tokenizer) over one world's pages; built once per world."""
    import bm25s

    world = kbqa.build_world(world_seed, n_entities)
    titles = list(world.docs)
    corpus = [f"{t}. {world.docs[t]}" for t in titles]
    tokenizer = bm25s.tokenization.Tokenizer(stopwords="en", stemmer=None)
    ids = tokenizer.tokenize(corpus, return_as="ids", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(ids, show_progress=False)
    return titles, retriever, tokenizer


def _snippet(text: str, terms: set[str], width: int = 160) -> str:
    """The sentence of ``text`` sharing most words with the query, cut to ``width``."""
    sentences = re.split(r"(?<=\.) ", text)
    best = max(sentences, key=lambda s: len(terms & set(re.findall(r"\w+", s.lower()))))
    return best if len(best) <= width else best[: width - 3] + "..."


def search(world_seed: int, n_entities: int, query: str, top_k: int = 5) -> str:
    """BM25 search over the pages: numbered titles with a snippet each."""
    if not isinstance(query, str) or not query.strip():
        return "Error: search needs a non-empty query string."
    titles, retriever, tokenizer = search_index(world_seed, n_entities)
    world = kbqa.build_world(world_seed, n_entities)
    q = tokenizer.tokenize([query], return_as="ids", update_vocab=False, show_progress=False)
    k = max(1, min(int(top_k), len(titles)))
    docs, scores = retriever.retrieve(q, k=k, show_progress=False)
    terms = set(re.findall(r"\w+", query.lower()))
    hits = [d for d, s in zip(docs[0], scores[0], strict=True) if s > 0]
    lines = [f"{i}. {titles[d]}: {_snippet(world.docs[titles[d]], terms)}"
             for i, d in enumerate(hits, 1)]
    if not lines:
        return f"No results for {query!r}. Try other keywords (names of people, places, companies)."
    return "\n".join(lines)


def open_page(world_seed: int, n_entities: int, title: str, max_chars: int = 2000) -> str:
    """The page titled ``title`` (case and spacing forgiven), or the closest titles."""
    if not isinstance(title, str) or not title.strip():
        return "Error: open_page needs a page title."
    world = kbqa.build_world(world_seed, n_entities)
    wanted = " ".join(title.strip().strip("\"'").split())
    found = wanted if wanted in world.docs else next(
        (t for t in world.docs if t.lower() == wanted.lower()), None)
    if found is None:
        close = difflib.get_close_matches(wanted, list(world.docs), n=5, cutoff=0.5)
        hint = f" Close titles: {'; '.join(close)}." if close else " Use search to find titles."
        return f"Error: no page titled {title!r}.{hint}"
    text = world.docs[found]
    if len(text) > max_chars:
        text = text[:max_chars] + f" [... truncated, {len(text) - max_chars} more characters]"
    return f"# {found}\n{text}"


# --- the environments -----------------------------------------------------------------------


class KBQAEnv:
    """Multi-hop QA over the fictional encyclopedia of one kbqa world."""

    suite = "kbqa"

    def __init__(self, seed: int = 0, world_seed: int = 0, n_entities: int = 400, top_k: int = 5,
                 max_page_chars: int = 2000):
        # ``seed`` (the run seed) does not pick the world: tasks default to world 0 too, so an env
        # made with any run seed answers the tasks made with any seed. reset(**row) follows the
        # row's world when it names one.
        self._seed = seed
        self._world = (int(world_seed), int(n_entities))
        self._top_k, self._max_chars = top_k, max_page_chars
        kbqa.build_world(*self._world)  # fail early on a bad size
        self.question, self.answer, self.final_answer, self.n_calls = None, None, None, 0

    def reset(self, **row) -> str | None:
        world = (row.get("metadata") or {}).get("world") or {}
        seed = row.get("world_seed", world.get("seed"))
        n = row.get("n_entities", world.get("n_entities"))
        if seed is not None and n is not None:
            self._world = (int(seed), int(n))
        self.question, self.answer = row.get("question"), row.get("answer")
        self.final_answer, self.n_calls = None, 0
        return None

    def search(self, query: str) -> str:
        """Search the encyclopedia for pages matching keywords.

        Args:
            query: Keywords, such as a person, organization, city or country name.

        Returns:
            The best matching page titles, each with a short snippet.
        """
        self.n_calls += 1
        return search(*self._world, query, top_k=self._top_k)

    def open_page(self, title: str) -> str:
        """Open one encyclopedia page and read its text.

        Args:
            title: The exact page title, as listed by search.

        Returns:
            The page text, or the closest titles if there is no such page.
        """
        self.n_calls += 1
        return open_page(*self._world, title, max_chars=self._max_chars)

    def get_reward(self) -> float:
        return rewards.score(self.suite, self.final_answer, self.answer)


class CalcEnv:
    """Word problems that need exact arithmetic, solved with a sandboxed Python interpreter."""

    suite = "calc"

    def __init__(self, seed: int = 0, timeout_s: float = 5.0, memory_mb: int = 512,
                 max_output: int = 4096):
        self._limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_output": max_output}
        self.question, self.answer, self.final_answer, self.n_calls = None, None, None, 0

    def reset(self, **row) -> str | None:
        self.question, self.answer = row.get("question"), row.get("answer")
        self.final_answer, self.n_calls = None, 0
        return None

    def python(self, code: str) -> str:
        """Run Python code in a sandbox and return what it prints.

        Args:
            code: A complete Python program; print() the values you need.

        Returns:
            The program's stdout and stderr, or an error naming the limit it hit.
        """
        self.n_calls += 1
        if not isinstance(code, str) or not code.strip():
            return "Error: python needs code to run."
        return format_observation(run_python(code, **self._limits))

    def get_reward(self) -> float:
        return rewards.score(self.suite, self.final_answer, self.answer)


ENV_CLASSES = {"kbqa": KBQAEnv, "calc": CalcEnv}

TOOL_SCHEMAS = {
    "kbqa": [
        {"type": "function", "function": {
            "name": "search", "description": "Search the encyclopedia for pages matching keywords.",
            "parameters": {"type": "object", "properties": {"query": {
                "type": "string", "description": "Keywords, such as a person, organization, city "
                                                 "or country name."}},
                "required": ["query"]},
            "return": {"type": "string", "description": "The best matching page titles, each "
                                                        "with a short snippet."}}},
        {"type": "function", "function": {
            "name": "open_page", "description": "Open one encyclopedia page and read its text.",
            "parameters": {"type": "object", "properties": {"title": {
                "type": "string", "description": "The exact page title, as listed by search."}},
                "required": ["title"]},
            "return": {"type": "string", "description": "The page text, or the closest titles if "
                                                        "there is no such page."}}},
    ],
    "calc": [
        {"type": "function", "function": {
            "name": "python", "description": "Run Python code in a sandbox and return what it "
                                             "prints.",
            "parameters": {"type": "object", "properties": {"code": {
                "type": "string", "description": "A complete Python program; print() the values "
                                                 "you need."}},
                "required": ["code"]},
            "return": {"type": "string", "description": "The program's stdout and stderr, or an "
                                                        "error naming the limit it hit."}}},
    ],
}


def _completion_text(completion) -> str:
    """The final assistant text of a TRL completion (a string or a list of chat messages)."""
    if isinstance(completion, str):
        return completion
    texts = [m.get("content") or "" for m in completion or [] if m.get("role") == "assistant"]
    texts = [t if isinstance(t, str) else "".join(p.get("text", "") for p in t) for t in texts]
    return texts[-1] if texts else ""


def answer_reward(completions, environments=None, answer=None, suite=None, **kwargs):
    """TRL reward function: score each completion's last ``<answer>`` against the gold answer.

    Uses the environment's answer and suite when given (and records the prediction on it, for
    its ``get_reward``), else the dataset's ``answer`` / ``suite`` columns.

    >>> answer_reward(["<answer>42</answer>", "no answer"], answer=["42.0", "1"],
    ...               suite=["calc", "calc"])
    [1.0, 0.0]
    """
    from coaflow.schema.markup import extract_answer

    out = []
    for i, completion in enumerate(completions):
        pred = extract_answer(_completion_text(completion))
        env = environments[i] if environments else None
        if env is not None:
            env.final_answer = pred
            out.append(env.get_reward())
        else:
            s = suite[i] if isinstance(suite, list) else (suite or "unknown")
            out.append(rewards.score(s, pred, answer[i] if answer is not None else None))
    return out
