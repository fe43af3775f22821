"""`RewardLookahead`: the one-step reward lookahead as a Q source, against a step-by-step direct computation."""

import math

import pytest
import torch

from tests.conftest import make_tiny_gpt2
from trl_qhead.decoding import QTiltLogitsProcessor, RewardLookahead, tilt_kl


def letter_count_reward(prompts, completions, **kwargs):
    """How often the prompt's last character occurs in the completion: a prefix-scorable reward that needs the
    prompt (context), so a source that lost or mixed up the prompts would score the wrong letter."""
    return [float(c.count(p.strip()[-1])) for p, c in zip(prompts, completions, strict=True)]


def _model_and_batch(gpt2_tokenizer):
    model = make_tiny_gpt2(seed=3).eval()
    model.generation_config.pad_token_id = gpt2_tokenizer.eos_token_id
    enc = gpt2_tokenizer(["The house", "A cat sat on a mat"], padding=True, padding_side="left", return_tensors="pt")
    return model, enc


def direct_tilted_logprobs(model, tokenizer, enc, sequences, beta, k, masked, lookahead_k=None):
    """Every step recomputed from scratch: the model's logits at the step, its top-k, the reward called on each
    candidate text, `log_softmax(logits + q / beta)` (q = 0 off the top-k, or the top-k alone when `masked`). With
    `lookahead_k`, each candidate's q adds `beta log(sum_b p(b) exp(effect_b / beta) + 1 - sum_b p(b))` over the
    top-`lookahead_k` tokens after it, from a forward of its own sequence."""
    width = enc["input_ids"].shape[1]
    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    prompts = [tokenizer.decode(ids) for ids in prompt_ids]

    def completion_text(row, ids):  # what the completion adds to the decoded prompt
        return tokenizer.decode(prompt_ids[row] + ids)[len(prompts[row]) :]

    full_mask = torch.cat([enc["attention_mask"], torch.ones_like(sequences[:, width:])], dim=-1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(sequences, attention_mask=full_mask, position_ids=positions).logits.float()
    steps = []
    for t in range(sequences.shape[1] - width):
        z = logits[:, width - 1 + t]
        top = z.topk(k, dim=-1).indices
        q = torch.zeros_like(z)
        for row in range(z.shape[0]):
            c = sequences[row, width : width + t].tolist()
            here = letter_count_reward([prompts[row]], [completion_text(row, c)])[0]
            for a in top[row].tolist():
                after = letter_count_reward([prompts[row]], [completion_text(row, c + [a])])[0]
                q[row, a] = after - here
                if lookahead_k and a != tokenizer.eos_token_id:
                    with torch.no_grad():
                        nxt = model(torch.tensor([prompt_ids[row] + c + [a]])).logits[0, -1].float().log_softmax(-1)
                    best = nxt.topk(lookahead_k)
                    inside = sum(
                        math.exp(
                            lp
                            + (letter_count_reward([prompts[row]], [completion_text(row, c + [a, b])])[0] - after)
                            / beta
                        )
                        for lp, b in zip(best.values.tolist(), best.indices.tolist(), strict=True)
                    )
                    q[row, a] += beta * math.log(inside + 1 - best.values.exp().sum().item())
        tilted = z + q / beta
        if masked:
            tilted = torch.full_like(z, float("-inf")).scatter(-1, top, tilted.gather(-1, top))
        steps.append((z, torch.log_softmax(tilted, -1)))
    return steps


@pytest.mark.parametrize("masked,lookahead_k", [(False, None), (True, None), (False, 3), (True, 3)])
def test_lookahead_tilt_matches_a_direct_step_by_step_computation(gpt2_tokenizer, masked, lookahead_k):
    model, enc = _model_and_batch(gpt2_tokenizer)
    beta, k = 0.5, 6
    source = RewardLookahead(
        model, gpt2_tokenizer, letter_count_reward, k=k, lookahead_k=lookahead_k, beta=beta if lookahead_k else None
    )
    processor = QTiltLogitsProcessor(source, beta, top_k=k if masked else None)
    torch.manual_seed(0)
    out = model.generate(
        **enc, logits_processor=[processor], do_sample=True, top_k=0, max_new_tokens=6,
        num_return_sequences=2, output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    enc = {key: value.repeat_interleave(2, dim=0) for key, value in enc.items()}
    steps = direct_tilted_logprobs(model, gpt2_tokenizer, enc, out.sequences, beta, k, masked, lookahead_k)
    kl = torch.zeros(out.sequences.shape[0])
    for scores, (z, expected) in zip(out.scores, steps, strict=True):
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
        kl += tilt_kl(z, expected)
    torch.testing.assert_close(processor.kl, kl, rtol=1e-4, atol=1e-4)
    # the tilt did something: some candidate changed the score (the letters occur in GPT-2 tokens)
    assert any((s - torch.log_softmax(z, -1)).abs().max() > 1e-3 for s, (z, _) in zip(out.scores, steps, strict=True))
    processor.remove()
    # cost: every row and step asks for k + 1 texts (k + 1 + k k2 with lookahead); memoised ones are scored once
    per_step = k + 1 + k * (lookahead_k or 0)
    assert source.cost.texts_requested == out.sequences.shape[0] * len(out.scores) * per_step
    assert 0 < source.cost.texts_scored <= source.cost.texts_requested


def test_lookahead_rejects_a_bad_k(gpt2_tokenizer):
    model, _ = _model_and_batch(gpt2_tokenizer)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="`k`"):
            RewardLookahead(model, gpt2_tokenizer, letter_count_reward, k=k)
    for kwargs, message in [
        ({"lookahead_k": 0, "beta": 0.3}, "`lookahead_k` \\(k2\\) must be a positive integer"),
        ({"lookahead_k": 2}, "needs `beta`"),
        ({"lookahead_k": 2, "beta": 0.0}, "`beta` must be"),
        ({"beta": 0.3}, "without `lookahead_k`"),
    ]:
        with pytest.raises(ValueError, match=message):
            RewardLookahead(model, gpt2_tokenizer, letter_count_reward, k=4, **kwargs)
