"""The HTTP gateway: OpenAI's API and a live mesh page in front of a mesh (``meshllm gateway``, whose
command line is :mod:`meshllm.cli.gateway`).

- :mod:`~meshllm.gateway.openai_api`: OpenAI requests, answers and errors in
  terms of the mesh's request API (pure).
- :mod:`~meshllm.gateway.meshview`: the mesh's state as read from its broker
  (members, planner, plan, readiness, live load), for ``/v1/models``, the
  readiness check and the mesh page.
- :mod:`~meshllm.gateway.app`: the Starlette app and its uvicorn server.
- ``static/``: the mesh page (plain HTML, CSS and JavaScript; no build step).
"""

from meshllm.gateway.app import GatewayConfig, create_app, serve_gateway

__all__ = ["GatewayConfig", "create_app", "serve_gateway"]
