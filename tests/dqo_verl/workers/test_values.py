"""V at every state of a response and log-probs of its tokens, batched and right-padded, against one unpadded
forward per row; Q of a step by hand."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from dqo_verl.workers.values import final_value, forward_logprobs, forward_values, step_q


def test_state_values_equal_unpadded_forwards_and_the_final_value_is_the_eos_state(tiny_models):
    model = AutoModelForTokenClassification.from_pretrained(tiny_models[1], dtype=torch.float32).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21, 2], [22], [23, 24, 25, 26, 27]]
    got = forward_values(model, prompts, responses, pad_token_id=0)
    for p, r, v in zip(prompts, responses, got):
        with torch.no_grad():
            out = model(torch.tensor([p + r])).logits[0, :, 0].double()
        # V(s_t), s_t = before response token t: the output at the token before it; s_T after the last token
        want = [out[len(p) - 1 + t].item() for t in range(len(r) + 1)]
        assert len(v) == len(r) + 1
        assert max(abs(a - b) for a, b in zip(v, want)) < 1e-5
    assert final_value(got[0], responses[0], eos_token_id=2) == got[0][2]  # the state that emitted eos
    # cut: at the state that emitted its last token, the last state V is trained on (not after it)
    assert final_value(got[2], responses[2], eos_token_id=2) == got[2][len(responses[2]) - 1]


def test_log_probs_equal_unpadded_forwards(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[0], dtype=torch.float32).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21, 2], [22], [23, 24, 25, 26, 27]]
    got = forward_logprobs(model, prompts, responses, pad_token_id=0)
    for p, r, lp in zip(prompts, responses, got):
        for t in range(len(r)):  # log p(r_t | p, r_<t) from a forward of exactly that context
            with torch.no_grad():
                logits = model(torch.tensor([p + r[:t]])).logits[0, -1].double()
            assert lp[t] == pytest.approx(torch.log_softmax(logits, -1)[r[t]].item(), abs=1e-5)


def test_step_q_is_the_value_before_the_step_plus_beta_times_its_log_ratio():
    values = np.array([0.1, 0.2, 0.4, 0.3, 0.9])  # V(s_0..s_4) of a 4-token response
    log_ratio = np.array([0.5, -1.0, 2.0, 4.0])
    # the step is tokens 2 and 3, from state s_2: 0.4 + 0.1 * (2 + 4)
    assert step_q(values, log_ratio, 2, beta=0.1) == pytest.approx(1.0)
    assert step_q(values, log_ratio, 0, beta=0.0) == pytest.approx(0.1)  # beta 0: the value before the step
