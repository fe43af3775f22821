"""Q-tilted decoding: sample from `pi'(a|s) ∝ pi(a|s) exp(Q(s, a) / beta)` inside ordinary `generate()`.

- `QTiltLogitsProcessor`: a `transformers.LogitsProcessor` that adds `Q(s, .) / beta` to the scores. It reads the
  hidden state of the last position from the same forward pass that produced the logits (a hook on the LM head), so
  the tilt costs one `H x |V|` product per token and no extra forward pass. It also records the exact
  `KL(pi' || pi)` of every generated sequence, in closed form over the whole vocabulary.
- `fold_tilt`: the tilt folded into the LM head (`W_lm + W_q / beta`): an ordinary causal LM that runs at the base
  model's speed in any generator and loads with plain `transformers`.
- Q sources beyond the head: `ImplicitQ` turns a (policy, reference) pair into `Q = c (log pi_policy - log pi_ref)`
  ("DPO treats LLMs as Q-functions"), usable by the same processor on the reference model.
- `rerank`: Q-probe-style best-of-k: score complete samples by the Q of their final action and pick or sample.
- `RewardLookahead`: a Q source without a head, the reward's own verdict on the top-k next tokens at each step (the
  one-step oracle; ARGS-style reward-guided decoding).

One module per job: `tilt` (the math, pure tensor functions), `sources` (where Q comes from), `processor` (the
logits processor), `fold` (folding into the LM head), `rerank`, `lookahead`. Every public name is re-exported here.
"""

from .fold import fold_tilt
from .lookahead import RewardLookahead
from .processor import QTiltLogitsProcessor
from .rerank import RerankOutput, rerank
from .sources import ImplicitQ, QHeadSource, QSource
from .tilt import tilt_kl, tilt_logprobs, tilt_logprobs_and_kl

__all__ = [
    "ImplicitQ",
    "QHeadSource",
    "QSource",
    "QTiltLogitsProcessor",
    "RerankOutput",
    "RewardLookahead",
    "fold_tilt",
    "rerank",
    "tilt_kl",
    "tilt_logprobs",
    "tilt_logprobs_and_kl",
]
