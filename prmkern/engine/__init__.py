"""The engine: one step loop (engine.py) and its parts.

scheduler.py picks the sequences of a step, block_manager.py owns the paged KV-cache blocks and the prefix cache,
runner.py runs the model on a step's batch (cuda_graphs.py captures its decode), sampler.py turns logits into
tokens and log-probabilities, sequence.py is one request's state. SamplingParams, what a user asks for, is the
API's (prmkern/sampling_params.py); this package knows nothing of the command line or of verification.
"""
