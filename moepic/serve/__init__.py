"""`moepic serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler
(runtime/scheduler.py). Side effects throughout: a worker thread, sockets, signals.

    commands/serve.py ─▶ server.py (uvicorn, drain on SIGTERM) ─▶ app.py (routes, errors)
        app.py ─▶ requests.py (an API request → token ids, limits) ─▶ worker.py (the thread that steps)
               ─▶ protocol.py (OpenAI bodies) · stops.py (stop strings) · chat.py (chat templates)
               ─▶ metrics.py (Prometheus)
"""
