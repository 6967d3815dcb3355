"""The pure inference core: model spec, parameter tree and functional layers.

Shape-suffix legend used throughout moepic:
  T tokens, S cache positions, D model width, F ffn width, E experts, K top-k,
  V vocabulary, H attention heads (Hq query, Hkv key/value), d head dim, L layers.
"""
