"""`CachedQNetwork`: the Q network's hidden state during `generate` from one cached forward per token equals a full
forward of the sequences so far, at every step, with left padding, sampling and beam search."""

import torch
from transformers import LogitsProcessor

from tests.conftest import make_tiny_gpt2, make_tiny_llama
from trl_qhead.decoding.kl_record import SequenceKLRecord
from trl_qhead.heads.q_network import CachedQNetwork, GenerateInputs, q_network_hidden


class Recorder(LogitsProcessor):
    """Calls the cached network at each step and keeps (ids, mask, h^Q) for the check afterwards."""

    def __init__(self, policy, network):
        self.inputs = GenerateInputs(policy)
        self.inputs.attach()
        self.cached = CachedQNetwork(network)
        self.record = SequenceKLRecord([])
        self.steps = []

    def __call__(self, input_ids, scores):
        parent = self.record.step(input_ids)
        mask = self.inputs.mask_for(input_ids)
        hidden = self.cached.step(input_ids, mask, parent)
        self.steps.append((input_ids.clone(), mask.clone(), hidden, parent))
        return scores


def _prompts(vocab):
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 8]]) % vocab
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask


def _check(policy, network, **generate_kwargs):
    recorder = Recorder(policy, network)
    ids, mask = _prompts(policy.config.vocab_size)
    policy.generate(
        input_ids=ids,
        attention_mask=mask,
        logits_processor=[recorder],
        max_new_tokens=6,
        pad_token_id=0,
        **generate_kwargs,
    )
    assert len(recorder.steps) == 6
    reordered = 0
    for input_ids, step_mask, hidden, parent in recorder.steps:
        full = q_network_hidden(network, input_ids, step_mask)[:, -1]
        torch.testing.assert_close(hidden, full, atol=1e-5, rtol=1e-5)
        if parent is not None and not torch.equal(parent, torch.arange(parent.numel())):
            reordered += 1
    return recorder, reordered


def test_cached_equals_full_forward_sampling_left_padding():
    policy, network = make_tiny_gpt2(vocab_size=64).eval(), make_tiny_llama(vocab_size=64, seed=1).eval()
    torch.manual_seed(0)
    recorder, _ = _check(policy, network, do_sample=True)
    assert recorder.steps[0][3] is None  # the first step is a new generation: the prompt runs whole
    # the padded row's hidden state differs from what it would be without the mask: padding is really masked
    ids, mask = recorder.steps[-1][0], recorder.steps[-1][1]
    unmasked = q_network_hidden(network, ids, torch.ones_like(mask))[:, -1]
    assert not torch.allclose(unmasked[0], recorder.steps[-1][2][0], atol=1e-4)


def test_cached_equals_full_forward_beam_search_reorders():
    policy, network = make_tiny_gpt2(vocab_size=64).eval(), make_tiny_gpt2(vocab_size=64, seed=3).eval()
    _, reordered = _check(policy, network, num_beams=3, num_return_sequences=3, do_sample=False)
    assert reordered > 0  # the beams did swap rows, and the cache followed them


def test_new_generation_resets_the_cache():
    policy, network = make_tiny_gpt2(vocab_size=64).eval(), make_tiny_gpt2(vocab_size=64, seed=3).eval()
    recorder = Recorder(policy, network)
    ids, mask = _prompts(64)
    for n in (3, 4):  # a second `generate` with other prompts: its first step must not continue the first's cache
        policy.generate(
            input_ids=ids[:, :n],
            attention_mask=mask[:, :n] if n > 2 else None,
            logits_processor=[recorder],
            max_new_tokens=3,
            pad_token_id=0,
            do_sample=False,
        )
    input_ids, step_mask, hidden, _ = recorder.steps[-1]
    torch.testing.assert_close(hidden, q_network_hidden(network, input_ids, step_mask)[:, -1], atol=1e-5, rtol=1e-5)
    assert recorder.steps[3][3] is None
