"""The decodings of an evaluation, a registry by kind: greedy and sampled answers, N samples ranked by the value
model (best-of-N by V or by Q) and by vote (majority@N), and step-level beams ranked by V or by Q
(docs/design.md, "Using V").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pandas as pd
from omegaconf import DictConfig

from dqo_verl.eval.sampling import GREEDY, grade_answers, sample_and_grade
from dqo_verl.eval.search import Ids, ValueBeam, best_by_value, majority_vote, run_beams
from dqo_verl.reward.formats import answer_format
from dqo_verl.reward.grading import extract_answer
from dqo_verl.reward.steps import STEP_SEPARATOR
from dqo_verl.workers.rollout import RolloutGroup, sample_seed
from dqo_verl.workers.values import ValueGroup, final_value, step_q

BEAM_LABELS = {"value": "value", "q": "Q"}  # evaluate.value.by -> the beam column's name


def value_guided(
    results: list[dict], prompts: pd.DataFrame, values: ValueGroup, eos_token_id: int, beta: float | None = None
) -> list[dict]:
    """N samples per problem -> the samples with their final value (decoding `sample xN`), and per problem the
    sample with the highest value (`best-of-N (V)`), the one the policy itself finds likeliest (`best-of-N
    (likelihood)`, the baseline with no value model) and the one majority voting picks (`majority@N`); given
    `beta` (value workers serving log-ratios), also each sample's Q estimate of its outcome, V(s_0) + beta *
    log(pi/pi_ref) of the whole response, and the sample with the highest (`best-of-N (Q)`). Every row carries
    the tokens its problem's N samples cost."""
    n = max(r["sample"] for r in results) + 1
    requests = ([prompts.iloc[r["uid"]]["prompt_ids"] for r in results], [r["response_ids"] for r in results])
    if beta is None:
        state_values = values.state_values(*requests)
    else:
        state_values, ratios = values.values_and_log_ratios(*requests)
        for r, v, lr in zip(results, state_values, ratios):
            r["q_value"] = step_q(v, lr, 0, beta)
    for r, v in zip(results, state_values):
        r["value"] = final_value(v, r["response_ids"], eos_token_id)
    by_problem: dict[int, list[dict]] = {}
    for r in results:
        by_problem.setdefault(r["uid"], []).append(r)
    rows = []
    for group in by_problem.values():
        tokens = sum(len(r["response_ids"]) for r in group)
        rows += [{**r, "decoding": f"sample x{n}", "tokens": tokens} for r in group]
        answers = [r["pred"] for r in group]  # a sample without an answer is never preferred (as in the vote)
        picks = {"V": best_by_value([r["value"] for r in group], answers)}
        if beta is not None:
            picks["Q"] = best_by_value([r["q_value"] for r in group], answers)
        # the baseline that needs no value model: the policy's own likelihood of each sample
        picks["likelihood"] = best_by_value([r["loglik"] for r in group], answers)
        rows += [{**group[i], "decoding": f"best-of-{n} ({by})", "tokens": tokens} for by, i in picks.items()]
        rows += [{**group[majority_vote([r["pred"] for r in group])], "decoding": f"majority@{n}", "tokens": tokens}]
    return rows


def beam_and_grade(
    group: RolloutGroup,
    values: ValueGroup,
    prompts: pd.DataFrame,
    seed: int,
    params: dict,
    tokenizer,
    beam: DictConfig,
    workers: int | None = None,
    beta: float | None = None,
    separator: str = STEP_SEPARATOR,
) -> list[dict]:
    """Step-level beam search for every prompt (`search.ValueBeam`; a step ends at `separator`), by V of the new
    prefix or, given `beta` and value workers serving log-ratios (`load_policies`), by Q of the step;
    graded: one dict per prompt with the best finished beam, its score and the tokens the search generated."""
    max_tokens, eos = params["max_tokens"], tokenizer.eos_token_id
    searches = [ValueBeam(beam.beams, beam.k, beam.max_rounds) for _ in range(len(prompts))]
    prompt_ids = [list(p) for p in prompts["prompt_ids"]]
    rounds = [0]

    def expand(requests, k):
        # a seed per (problem, round, beam of that problem, continuation): independent of the other problems
        beam_of, count = [], Counter()
        for i, _ in requests:
            beam_of.append(count[i])
            count[i] += 1
        reqs = [(i, prefix, b, j) for (i, prefix), b in zip(requests, beam_of) for j in range(k)]
        outs = group.generate(
            [prompt_ids[i] + list(prefix) for i, prefix, _, _ in reqs],
            [sample_seed(seed, i, rounds[0], b, j) for i, _, b, j in reqs],
            {**params, "stop": [separator]},
            max_tokens=[max_tokens - len(prefix) for _, prefix, _, _ in reqs],
        )
        rounds[0] += 1
        conts = [
            (
                tuple(o["response_ids"]),
                o["finish_reason"] != "step" or len(prefix) + len(o["response_ids"]) >= max_tokens,
            )
            for (_, prefix, _, _), o in zip(reqs, outs)
        ]
        return [conts[n * k : (n + 1) * k] for n in range(len(requests))]

    def score(requests, continuations):
        flat = [
            (i, list(prefix) + list(new), len(prefix))
            for (i, prefix), conts in zip(requests, continuations)
            for new, _ in conts
        ]
        prompts_, responses = [prompt_ids[i] for i, _, _ in flat], [ids for _, ids, _ in flat]
        if beta is None:
            state = values.state_values(prompts_, responses)
            scores = [final_value(v, ids, eos) for v, ids in zip(state, responses)]
        else:
            state, ratios = values.values_and_log_ratios(prompts_, responses)
            scores = [step_q(v, lr, start, beta) for v, lr, (_, _, start) in zip(state, ratios, flat)]
        k = len(continuations[0]) if continuations else 0
        return [scores[n * k : (n + 1) * k] for n in range(len(requests))]

    formats = [answer_format(src) for src in prompts["data_source"]]

    def answered(i: int, ids: Ids) -> bool:  # beams without an answer are picked last, as in best-of-N
        text = tokenizer.decode(list(ids), skip_special_tokens=True)
        return formats[i] is None or extract_answer(text, formats[i]) is not None

    best = run_beams(searches, expand, score, answered)
    texts = [tokenizer.decode(list(b.ids), skip_special_tokens=True) for b in best]
    graded = grade_answers(prompts, list(range(len(prompts))), texts, workers, "grading beams")
    return [
        {
            "uid": u,
            "sample": 0,
            "response": text,
            "response_ids": list(b.ids),
            "finish_reason": "stop" if b.ids and b.ids[-1] == eos else "length",
            "value": b.score,
            "tokens": s.tokens,
            **g,
        }
        for u, (b, s, text, g) in enumerate(zip(best, searches, texts, graded))
    ]


# ---------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Run:
    """One decoding of one evaluation set: `kind` (a key of DECODINGS), its column label, seed, samples per problem,
    sampling parameters, and for a beam what it ranks by (`value` | `q`)."""

    kind: str
    label: str
    seed: int
    n: int
    params: dict
    by: str | None = None


@dataclass(frozen=True)
class Context:
    """What every decoding of one model on one set shares."""

    group: RolloutGroup
    values: ValueGroup | None
    tokenizer: object
    cfg: DictConfig
    q_beta: float | None  # set when the value workers serve log(pi/pi_ref) of this model (ranking by Q)
    desc: str


def planned_runs(e: DictConfig, spec: DictConfig, guided: bool) -> list[Run]:
    """The decodings `evaluate` asks for on one set: greedy; sampling over the seeds (one seed when the set takes
    several samples per problem); with a value model, N samples ranked by V/Q and by vote, and the beams by V/Q."""
    sampling = {k: e.sampling[k] for k in ("temperature", "top_p", "top_k", "min_p")}
    per_problem = spec.get("samples", 1)
    seeds = [e.sampling.seeds[0]] if per_problem > 1 else list(e.sampling.seeds)
    first_seed = e.sampling.seeds[0] if e.sampling.seeds else 0
    runs = [Run("greedy", "greedy", 0, 1, GREEDY)] if e.greedy else []
    runs += [Run("sample", "sample", s, per_problem, sampling) for s in seeds]
    if guided:
        runs.append(Run("value", "value", first_seed, e.value.n, sampling))
        if e.value.beam:
            b = e.value.beam
            label = f"beam {b.beams}x{b.k}"
            runs += [Run("beam", f"{BEAM_LABELS[by]} {label}", first_seed, 1, sampling, by) for by in e.value.by]
    return runs


def sampled(ctx: Context, run: Run, prompts: pd.DataFrame, params: dict) -> list[dict]:
    """Greedy or sampled answers, `run.n` per problem."""
    return sample_and_grade(ctx.group, prompts, run.n, run.seed, params, ctx.cfg.score.workers, ctx.desc)


def ranked(ctx: Context, run: Run, prompts: pd.DataFrame, params: dict) -> list[dict]:
    """N samples per problem, each scored by V (and Q); best-of-N by each and majority@N (`value_guided`)."""
    results = sampled(ctx, run, prompts, params)
    return value_guided(results, prompts, ctx.values, ctx.tokenizer.eos_token_id, ctx.q_beta)


def beam(ctx: Context, run: Run, prompts: pd.DataFrame, params: dict) -> list[dict]:
    """Step-level beam search ranked by V (or by Q)."""
    beta = ctx.q_beta if run.by == "q" else None
    cfg = ctx.cfg
    return beam_and_grade(
        ctx.group,
        ctx.values,
        prompts,
        run.seed,
        params,
        ctx.tokenizer,
        cfg.evaluate.value.beam,
        cfg.score.workers,
        beta,
        cfg.process.separator,
    )


DECODINGS = {"greedy": sampled, "sample": sampled, "value": ranked, "beam": beam}
