"""V at every state of a response, batched and right-padded, against one unpadded forward per row."""

import torch
from transformers import AutoModelForTokenClassification

from dqo_verl.values import final_value, forward_values


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
    assert final_value(got[2], responses[2], eos_token_id=2) == got[2][5]  # cut: after its last token
