"""What the rollout side hands the trainer.

A ``Sample`` is one response to one prompt; a group is the ``n`` samples of one prompt (GRPO); a
``Batch`` is a list of complete groups. Per response token we keep the behaviour log-prob (the log-prob
under the weights that sampled it, ``log_softmax(logits / T)``) and the integer weight version that
produced it.

Advantages are GRPO group-normalised rewards (:func:`group_advantages`, recipe ``loss.adv_norm``):

* ``mean``: ``A_i = r_i - mean(r)`` (no std division; Dr. GRPO, slime's disable-std option);
* ``mean_std`` (default): ``A_i = (r_i - mean(r)) / (std(r) + eps)`` with the unbiased std (ddof = 1),
  as verl, slime and AReaL use it;
* ``mean_std_population``: the same with the population std (ddof = 0).

``eps`` is ``loss.adv_eps``. A group whose rewards are all equal gets zeros (never NaN; a group of one
sample too). Optionally (``loss.adv_batch_norm``) the group advantages of a whole batch are normalised
once more over its response tokens (:func:`batch_normalise`: token-weighted mean and population std),
as AReaL's A-3PO GSM8K example does. Every token of a response shares its sample's advantage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ADV_EPS = 1e-6
ADV_NORMS = ("mean", "mean_std", "mean_std_population")


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
    # (segment index, tokens) of the requests that produced the response (a sample a weight update aborted is
    # resumed in a new segment); the schedule a run records (schedule.py) is made of these and ``versions``
    segments: list[tuple[int, int]] = field(default_factory=list)

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


def group_advantages(rewards: list[float], norm: str = "mean_std", eps: float = ADV_EPS) -> list[float]:
    """GRPO advantages of one group: rewards minus the group mean, divided (``mean_std*``) by std + eps."""
    if norm not in ADV_NORMS:
        raise ValueError(f"loss.adv_norm: unknown advantage normalisation {norm!r}; expected one of {ADV_NORMS}")
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    if max(rewards) == min(rewards):  # constant rewards: exactly zero, whatever the rounding of the mean
        return [0.0] * n
    centred = [r - mean for r in rewards]
    if norm == "mean":
        return centred
    ddof = 1 if norm == "mean_std" else 0
    std = (sum(c * c for c in centred) / (n - ddof)) ** 0.5 if n > ddof else 0.0
    return [c / (std + eps) for c in centred]


def batch_normalise(advantages: list[float], weights: list[float], eps: float = ADV_EPS) -> list[float]:
    """Advantages normalised over a batch: ``(A - mean) / (std + eps)`` with the mean and population std
    weighted by ``weights`` (each sample's response-token count: a token-level normalisation)."""
    if len(advantages) != len(weights):
        raise ValueError(f"{len(advantages)} advantages but {len(weights)} weights")
    tot = float(sum(weights))
    if tot <= 0:
        return [0.0] * len(advantages)
    mean = sum(a * w for a, w in zip(advantages, weights)) / tot
    var = sum(w * (a - mean) ** 2 for a, w in zip(advantages, weights)) / tot
    return [(a - mean) / (var ** 0.5 + eps) for a in advantages]
