"""Cache replacement policies (LRU, LFU, LCP, static, random, Belady) as pure, registered strategies.

Each policy is a state update plus a priority score; eviction mechanics live once in the core's
residency planner. Arrives with the offloading runtime (issue 4).
"""
