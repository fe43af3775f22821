"""Moved to `trl_qhead.heads.tied`; kept so that `from trl_qhead.tied_head import TiedQHead` still works."""

from .heads.tied import TiedQHead, check_q_head_rank, lm_head_weight

__all__ = ["TiedQHead", "check_q_head_rank", "lm_head_weight"]
