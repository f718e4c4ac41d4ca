"""Choosing the next token (engine-core process): the batched sampler and its persistent
per-row state, grammar masks and the grammar matcher, prompt logprobs. It imports neither
the client nor the runner.
"""
