"""The OpenAI-compatible chat API (``medrwr serve api``; docs/serving.md).

Split like vLLM's ``chat_completion/`` and like :mod:`medrwr.retrieval.service`: :mod:`.schemas` (pydantic
requests), :mod:`.requests` (limits, options, the rollout request), :mod:`.images` (image inputs),
:mod:`.scheduler` (batching concurrent requests into one engine run), :mod:`.views` (the ``medrwr`` trace
field, usage), :mod:`.streaming` (SSE chunks), :mod:`.metrics`, :mod:`.app` (routes) and :mod:`.server`
(bind, build the engine, run uvicorn).
"""
