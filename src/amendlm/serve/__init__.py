"""``amendlm serve``: an OpenAI-compatible HTTP server for a model, a debiased adapter, or one frozen
proposal with many aligners (RAM), with a batching scheduler over the library's decoding loop."""
