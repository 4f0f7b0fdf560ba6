"""Serving a checkpoint: the engine (load once, micro-batch, stream; engine.py), image intake with
limits and URL policy (images.py), the OpenAI-compatible FastAPI app and web page (app.py,
schemas.py, static/), terminal chat (chat.py) and offline batch inference (predict.py).

Heavy modules are not imported here, so `import llava_ultra.serve` stays cheap.
"""
