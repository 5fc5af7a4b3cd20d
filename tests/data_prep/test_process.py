"""Process scores: segmentation (character and BPE tokenizers), the two search strategies, rewards."""

import random

import pandas as pd
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_prep import synthetic
from data_prep.process import SearchState, process_rewards, search, search_prefixes
from dqo_verl.reward.steps import segment_ends, separator_ends

TEXT = "3*4=12\n\n5+12=17\n\n\n17-2=15\n\n#### 15"


def test_separator_ends():
    assert separator_ends(TEXT) == [8, 18, 27]  # a run of three newlines is one separator
    assert [TEXT[e - 2 : e] for e in separator_ends(TEXT)] == ["\n\n"] * 3
    assert separator_ends("a\n\nb\n\n") == [3]  # trailing blank line: no empty last segment
    assert separator_ends("one segment") == []
    many = "\n\n".join(str(i) for i in range(10))
    assert len(separator_ends(many)) == 9 and len(separator_ends(many, max_segments=4)) == 3


def check_exact(ids, tokenizer, ends):
    """Each end is the first token whose decoded prefix covers the separator."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    seps = separator_ends(text)
    assert len(ends) == len(seps) + 1 and ends[-1] == len(ids) - 1
    for t, e in zip(ends, seps):
        assert tokenizer.decode(ids[: t + 1], skip_special_tokens=True).startswith(text[:e])
        assert not tokenizer.decode(ids[:t], skip_special_tokens=True).startswith(text[:e])


def test_segment_ends_character_tokenizer(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models[0])
    ids = tok(TEXT)["input_ids"] + [tok.eos_token_id]
    ends = segment_ends(ids, tok)
    check_exact(ids, tok, ends)
    assert ends == [7, 17, 26, len(ids) - 1]  # character tokens: offset - 1


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE trained offline on solutions, without whitespace pre-splitting, so merges
    cross blank lines (tokens like '2\\n\\n5')."""
    texts = [p["solution"] for p in synthetic.make_problems(3000, seed=4)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=800, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_segment_ends_bpe_tokenizer_with_merged_blank_lines(bpe_tokenizer):
    tok = bpe_tokenizer
    spanning = 0
    for p in synthetic.make_problems(200, seed=11):
        ids = tok(p["solution"])["input_ids"] + [tok.eos_token_id]
        ends = segment_ends(ids, tok)
        check_exact(ids, tok, ends)
        text = tok.decode(ids, skip_special_tokens=True)
        for t, e in zip(ends, separator_ends(text)):
            piece = tok.decode(ids[t : t + 1])
            spanning += len(tok.decode(ids[: t + 1], skip_special_tokens=True)) > e and "\n" in piece
    assert spanning > 50  # the hard case (a token holding the blank line and what follows) is exercised


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_both_strategies_find_the_threshold(n):
    probes = {"linear": 0, "binary": 0}
    for threshold in range(n):  # prefixes 1..threshold are correct
        for strategy in probes:
            found, tried = search(n, lambda i, t=threshold: i <= t, strategy)
            assert found == threshold
            probes[strategy] += len(tried)
    if n >= 5:
        assert probes["binary"] < probes["linear"]


def test_non_monotone_case_where_strategies_differ():
    """Prefixes 1 and 3 of 4 are correct but 2 is not: the paper's scan finds 3, binary search 1
    (it assumes a prefix of a correct prefix is correct and never looks above a failure)."""
    correct = {1: True, 2: False, 3: True}.__getitem__
    assert search(4, correct, "linear") == (3, [3])
    assert search(4, correct, "binary") == (1, [2, 1])


def test_search_state_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        SearchState(4, "ternary")


def test_process_rewards():
    assert process_rewards(4, 0, outcome_correct=True) == [0.25] * 4
    assert process_rewards(4, 3, outcome_correct=False) == [0.25, 0.25, 0.25, 0.0]
    assert process_rewards(4, 0, outcome_correct=False) == [0.0] * 4
    assert process_rewards(5, 2, False, segment_reward=0.1) == [0.1, 0.1, 0.0, 0.0, 0.0]
    assert process_rewards(3, 0, True, reward_correct_responses=False) == [0.0] * 3
    assert sum(process_rewards(7, 7, True)) == pytest.approx(1.0)


class ThresholdCompleter:
    """Completions are right iff the prefix has at most `threshold[uid]` segments; counts requests."""

    def __init__(self, corpus, ends, tokenizer, thresholds):
        self.thresholds, self.requests, self.tok = thresholds, 0, tokenizer
        self.by_prompt, self.prompt_ids = {}, list(corpus["prompt_ids"])
        for row in range(len(corpus)):
            rec = corpus.iloc[row]
            for i in range(1, len(ends[row])):
                key = tuple(rec["prompt_ids"]) + tuple(rec["response_ids"][: ends[row][i - 1] + 1])
                self.by_prompt[key] = (row, i, rec["reward_model"]["ground_truth"])

    def generate(self, prompts, seeds, params, max_tokens):
        self.requests += len(prompts)
        out = []
        for p, s, limit in zip(prompts, seeds, max_tokens):
            row, i, truth = self.by_prompt[tuple(p)]
            prompt_length = len(self.prompt_ids[row])
            assert limit == params["max_tokens"] - (len(p) - prompt_length)  # prefix + completion within the limit
            lucky = random.Random(s).random() < 0.5  # some of the K completions fail anyway
            answer = truth if i <= self.thresholds[row] and lucky else "-1"
            out.append({"response": f"\n\n#### {answer}", "response_ids": [1, 2, 3]})
        return out


def test_batched_search_with_seeded_completions(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models[0])
    problems = synthetic.make_problems(12, seed=8, difficulty=synthetic.Difficulty(min_events=3, max_events=5))
    rows = []
    for uid, p in enumerate(problems):
        wrong = p["solution"].rsplit("#### ", 1)[0] + "#### 0"
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": p["question"]}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        rows.append(
            {
                "uid": uid,
                "sample": 0,
                "prompt_ids": prompt,
                "response_ids": tok(wrong)["input_ids"] + [tok.eos_token_id],
                "reward_model": {"ground_truth": p["answer"]},
                "data_source": synthetic.DATA_SOURCE,
                "score": 0.0,
            }
        )
    corpus = pd.DataFrame(rows)
    ends = [segment_ends(ids, tok) for ids in corpus["response_ids"]]
    thresholds = {row: row % len(ends[row]) for row in range(len(corpus))}
    found, spent = {}, {}
    for strategy in ("linear", "binary"):
        completer = ThresholdCompleter(corpus, ends, tok, thresholds)
        found[strategy], spend = search_prefixes(
            corpus,
            ends,
            list(range(len(corpus))),
            completer,
            strategy,
            k=6,
            seed=0,
            params={"max_tokens": 200},
            tokenizer=tok,
            workers=1,
        )
        assert spend.completions == completer.requests
        spent[strategy] = spend.completions
    assert found["linear"] == found["binary"] == thresholds
    assert spent["binary"] < spent["linear"]
