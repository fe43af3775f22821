"""Small-vocabulary generation helpers shared by the decoding tests (the tilt, the exclusion): left-padded prompt
batches and greedy-by-default `generate` calls with our pad token."""

import torch

EOS = 5  # small-vocabulary models stop often on this token, so finished rows are exercised
PAD = 0


def left_padded(lengths, vocab, seed=0):
    """A left-padded batch of prompts (PAD tokens and zero mask on the left), avoiding EOS and PAD inside."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(EOS + 1, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def generate(model, ids, mask, processors=(), **kwargs):
    """`model.generate` on the batch with `processors`: greedy, 8 new tokens and PAD padding unless overridden."""
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD, **kwargs}
    return model.generate(input_ids=ids, attention_mask=mask, logits_processor=list(processors), **kwargs)
