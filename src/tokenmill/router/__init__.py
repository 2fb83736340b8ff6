"""tokenmill's router: one OpenAI endpoint in front of many workers (``tokenmill route``).

It speaks to workers only over HTTP, so it fronts tokenmill, vLLM or SGLang
workers alike; see ``router/app.py``.
"""
