"""Expert predictors (gate lookahead, learned MLP, oracle) as pure, registered strategies.

They plug into the MoE block's routing step to prefetch the next layer's experts. Arrive with the
prefetch issue (issue 5).
"""
