"""One worker process: OpenAI-compatible HTTP and gRPC fronts over an ``AsyncEngine``, with metrics."""
