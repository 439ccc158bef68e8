"""Request policies (cache, budgets, rate limits, experiments, templates): run in a fixed order."""

from policies.base import STAGES, Policy, PolicyChain
from policies.context import ANONYMOUS, AttemptRecord, Outcome, Principal, Reply, RequestContext

__all__ = ["ANONYMOUS", "STAGES", "AttemptRecord", "Outcome", "Policy", "PolicyChain", "Principal", "Reply",
           "RequestContext"]
