"""medrwr.serve: the OpenAI-compatible chat API over the whole loop (:mod:`medrwr.serve.api`, docs/serving.md)
and the web page it serves (``medrwr/serve/web/``)."""
