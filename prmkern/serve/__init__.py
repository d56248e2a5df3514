"""prmkern's HTTP server: OpenAI-compatible completions and chat plus /v1/verify, on one continuously batched engine.

engine_loop.py: the thread that owns and steps the engine; calls.py: one HTTP call's requests in that loop;
protocol.py: request bodies; openai_api.py and verify_api.py: the endpoints (logprobs.py: their log-probability
JSON); metrics.py: /metrics; app.py: the FastAPI app; background.py: the server on a thread of this process;
prmkern/cli/serve.py: `prmkern serve`. Importing this package does not import FastAPI (only app.py and the endpoint modules do).
"""
