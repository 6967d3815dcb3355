"""Cache replacement policies as pure, registered strategies: lru, lfu, lcp, static, random, belady,
learned.

Each policy is a state update plus a priority score (policies/base.py); eviction mechanics live
once, in the residency planner (moepic/cache/planner.py). Importing this package registers them all.
"""

from moepic.policies import belady, lcp, learned, lfu, lru, random, static  # noqa: F401  (registration)
from moepic.policies.base import POLICIES, CachePolicy, LayerStep, PolicyConfig, build_policy, known_policies

__all__ = ["POLICIES", "CachePolicy", "LayerStep", "PolicyConfig", "build_policy", "known_policies"]
