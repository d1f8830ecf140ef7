"""What the rollout side hands the trainer.

A ``Sample`` is one response to one prompt; a group is the ``n`` samples of one prompt (GRPO); a
``Batch`` is a list of complete groups. Per response token we keep the behaviour log-prob (the log-prob
under the weights that sampled it, ``log_softmax(logits / T)``) and the integer weight version that
produced it.

Advantages are GRPO group-normalised rewards: ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the
group's samples, with the population std (ddof = 0) and ``eps = 1e-6``; a group whose rewards are all
equal gets zeros. Every token of a response shares its sample's advantage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ADV_EPS = 1e-6


@dataclass
class Sample:
    group_id: int  # unique per admitted prompt group (a regenerated group gets a new id)
    prompt_index: int  # position of the prompt in the dataset
    sample_index: int  # 0..n-1 within the group
    prompt_ids: list[int]
    response_ids: list[int]
    behave_logprobs: list[float]  # one per response token
    versions: list[int]  # weight version that produced each response token
    finish_reason: str  # "stop" | "length"
    reward: float = 0.0
    advantage: float = 0.0
    text: str = ""
    rids: list[str] = field(default_factory=list)  # engine request ids of the segments (debug/tests)

    @property
    def min_version(self) -> int:
        return min(self.versions) if self.versions else -1

    def staleness(self, current_version: int) -> int:
        """How many versions the oldest token is behind ``current_version`` (0 if no tokens)."""
        return current_version - self.min_version if self.versions else 0


@dataclass
class Batch:
    groups: list[list[Sample]]
    version: int  # the trainer version it was requested for

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)

    def staleness(self) -> list[int]:
        """Per-token staleness ``version - token_version`` over the whole batch."""
        return [self.version - v for s in self.samples for v in s.versions]

    def to_padded(self, pad_id: int = 0):
        """Right-padded tensors for the trainer: dict of
        input_ids [B, L] (prompt + response), loss_mask [B, L] (1 on response tokens),
        behave_logprobs [B, L], versions [B, L] (-1 off-response), advantages [B], rewards [B],
        prompt_lens [B], response_lens [B]. Position t of behave_logprobs/loss_mask refers to token t
        (predicted from position t-1)."""
        import torch

        ss = self.samples
        L = max(len(s.prompt_ids) + len(s.response_ids) for s in ss)
        B = len(ss)
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.float32)
        lp = torch.zeros((B, L), dtype=torch.float32)
        ver = torch.full((B, L), -1, dtype=torch.long)
        for i, s in enumerate(ss):
            p, r = len(s.prompt_ids), len(s.response_ids)
            ids[i, :p + r] = torch.tensor(s.prompt_ids + s.response_ids)
            mask[i, p:p + r] = 1
            lp[i, p:p + r] = torch.tensor(s.behave_logprobs, dtype=torch.float32)
            ver[i, p:p + r] = torch.tensor(s.versions)
        return {
            "input_ids": ids, "loss_mask": mask, "behave_logprobs": lp, "versions": ver,
            "advantages": torch.tensor([s.advantage for s in ss], dtype=torch.float32),
            "rewards": torch.tensor([s.reward for s in ss], dtype=torch.float32),
            "prompt_lens": torch.tensor([len(s.prompt_ids) for s in ss]),
            "response_lens": torch.tensor([len(s.response_ids) for s in ss]),
        }


def group_advantages(rewards: list[float], eps: float = ADV_EPS) -> list[float]:
    """GRPO: (r - mean) / (std + eps), population std over the group."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    std = (sum((r - mean) ** 2 for r in rewards) / n) ** 0.5
    return [(r - mean) / (std + eps) for r in rewards]
