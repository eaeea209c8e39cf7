"""The database-free request pipeline shared by the server's worker and ``vllm-batch run``.

``dispatch`` (lines → engine, bounded in flight), ``output`` (result and error lines, in
OpenAI's or ``vllm run-batch``'s shape) and ``results`` (``LineResult``). Nothing here
imports SQLAlchemy or vLLM.
"""
